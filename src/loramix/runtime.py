"""What every command shares: processes (torchrun), device and precision, and tokenizer + data + model setup."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from loramix.config import Config, TrainConfig
from loramix.data.prepare import prepare_data
from loramix.errors import LoramixError
from loramix.model import load_base_model, load_tokenizer


@dataclass(frozen=True)
class Dist:
    """This process's place among torchrun's processes (one process: rank 0 of 1, and every call a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tdist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out


def init_distributed(tc: TrainConfig) -> Dist:
    """Join torchrun's process group when launched by it (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    if not tdist.is_initialized():
        gpu = torch.cuda.is_available() and not tc.device.startswith("cpu")
        tdist.init_process_group("nccl" if gpu else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(tc: TrainConfig, dist: Dist = Dist()) -> tuple[torch.device, str]:
    """The device, and the precision 'auto' means on it (fp32 on CPU: bf16 there is ~60x slower)."""
    name = tc.device if tc.device != "auto" else (f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoramixError(f"train.device={tc.device} but no CUDA GPU is visible; use train.device=cpu")
    precision = tc.precision
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp16" and device.type != "cuda":
        raise LoramixError("train.precision=fp16 needs a CUDA GPU; use train.precision=fp32 on CPU")
    return device, precision


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def compile_body(model, tc: TrainConfig, device: torch.device) -> bool:
    """torch.compile the transformer body in place (names and state dict unchanged); returns whether it did."""
    if tc.compile == "off" or (tc.compile == "auto" and device.type != "cuda"):
        return False
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm.base_model.compile(dynamic=True)  # row lengths vary from batch to batch
    return True


def setup(cfg: Config, log=print):
    """Tokenizer, prepared data and base model: shared by `train` and `eval`, so both see the same data."""
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, log, cfg.eval.forgetting_sources)
    model = load_base_model(cfg.model, cfg.data.seq_len)
    return tokenizer, data, model
