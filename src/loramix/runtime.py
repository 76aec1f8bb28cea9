"""What every command shares: processes (torchrun), the device and precision, stopping on a signal, and
whether progress bars can be drawn."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from loramix.config import DEVICES
from loramix.errors import LoramixError


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


def init_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group when launched by it (NCCL on GPUs, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    if not tdist.is_initialized():
        gpu = torch.cuda.is_available() and not device.startswith("cpu")
        tdist.init_process_group("nccl" if gpu else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def finish_distributed() -> None:
    """Leave torchrun's process group once every process is done. A gloo group left for interpreter exit
    to tear down can abort its process ("terminate called without an active exception") while rank 0
    still writes the results."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def resolve_device(name: str, dist: Dist = Dist()) -> torch.device:
    """The device `name` means for this process: 'auto' is this process's GPU (torchrun's LOCAL_RANK)
    when there is one, else the CPU; 'cuda' and 'cuda:N' need a visible GPU.

    Raises:
        LoramixError: a name that is no device, or a GPU that is not there.
    """
    if not DEVICES.fullmatch(name):
        raise LoramixError(f"device {name!r} is not one loramix runs on; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # this process's GPU: under torchrun each process has its own, never all cuda:0
        name = f"cuda:{dist.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoramixError(f"device {name} asked for, but no CUDA GPU is visible; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoramixError(f"device {name} asked for, but only {torch.cuda.device_count()} GPU(s) are visible; pick one of "
                               f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """What 'auto' means on `device`: bf16 where the GPU has it, else fp16 (with the grad scaler); fp32 off
    CUDA. fp16 and bf16 run on a CPU too (CPU autocast, and a CPU grad scaler for fp16), which is how the
    tests exercise the GPU's mixed-precision paths, but on most CPUs they are far slower than fp32."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return precision


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def progress_bars() -> bool:
    """Whether a tqdm bar can be drawn: on a terminal, or in a Jupyter notebook, where `tqdm.auto` draws
    a widget (a redirected stderr, such as a CI log, gets log lines instead)."""
    import sys

    import tqdm.auto  # noqa: F401 -- imports autonotebook quietly, which picks the notebook bar in a kernel
    from tqdm import autonotebook, std

    return sys.stderr.isatty() or autonotebook.tqdm is not std.tqdm


class Interrupted(LoramixError):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps; a second signal acts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
