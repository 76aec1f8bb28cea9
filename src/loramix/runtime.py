"""What every command shares: device and precision choice, and tokenizer + data + base model setup."""

from __future__ import annotations

import contextlib

import torch

from loramix.config import Config, TrainConfig
from loramix.data.prepare import prepare_data
from loramix.errors import LoramixError
from loramix.model import load_base_model, load_tokenizer


def resolve_device(tc: TrainConfig) -> tuple[torch.device, str]:
    """The device, and the precision 'auto' means on it (fp32 on CPU: bf16 there is ~60x slower)."""
    name = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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
    data = prepare_data(cfg.data, tokenizer, log)
    model = load_base_model(cfg.model, cfg.data.seq_len)
    return tokenizer, data, model
