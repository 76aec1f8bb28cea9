"""The packed-weight kernel: large linear layers through oneDNN on weights packed once, for generation on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loramix.model import unwrap


class _Packed(torch.nn.Module):
    """A linear layer's matmul through oneDNN on a copy of its weight packed once (inference only). The
    Parameters stay as they were: tied embeddings, the state dict, the fingerprint and PEFT (which reads a base
    layer's weight, e.g. for DoRA) still see them."""

    def __init__(self, layer: torch.nn.Module, weight: torch.Tensor):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.__dict__["original"] = layer  # not a submodule: for `unpacked`, outside the state dict
        # packed for 16 rows: any hint of 4 or more measured the same from 1 to 32 rows, a hint of 1 was slower everywhere
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)  # (out, in); a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# Smaller layers stay with MKL: oneDNN's call costs more there for one row (128 x 384: 20 against 7 us; 768 x
# 768: 53 against 48). From ~1M weights packing is as fast for one row and 1.5x faster for 16 (512 x 2,048: 77
# against 76-90 us, 322 against 463-494), one thread on this project's CPUs.
_PACKED_AT_LEAST = 1 << 20


def pack_linears(model) -> int:
    """Run the model's large linear layers (nn.Linear, GPT-2's Conv1D, the LM head; not LoRA's own) through
    oneDNN with their weights packed, for generation on CPU in fp32; returns how many it packed.

    MKL's kernels for the few rows of a decode step are slow on this project's AMD CPUs, most of all for the
    (out, in) weight of an nn.Linear. One thread: GPT-2's 50,257-token head at width 128 takes 3.3 ms for one row
    and 6.5 for 16 through MKL, 1.0 and 2.9 packed; a Qwen2-0.5B-sized MLP projection (896 -> 4,864) 0.88 and 3.1
    ms, 0.54 and 1.6 packed. The cost is a second copy of each packed weight in memory (GPT-2 124M: +0.5 GB).
    Left alone: layers under _PACKED_AT_LEAST weights, on another device or in another dtype, other module types.
    """
    from transformers.pytorch_utils import Conv1D

    if not torch.backends.mkldnn.is_available():
        return 0
    found = []
    for parent, child_name, child, path in _children(model):
        if "lora_" in path or type(child) not in (torch.nn.Linear, Conv1D):
            continue
        weight = child.weight if type(child) is torch.nn.Linear else child.weight.t()  # Conv1D keeps (in, out)
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= _PACKED_AT_LEAST:
            found.append((parent, child_name, child, weight))
    for parent, child_name, child, weight in found:
        setattr(parent, child_name, _Packed(child, weight))
    return len(found)


@contextlib.contextmanager
def unpacked(model) -> Iterator[None]:
    """The packed layers' own modules back in their places while the block runs (PEFT wraps only module types
    it knows: loading an adapter may wrap one), then the packed ones again wherever those modules are by then."""
    packed = {}
    for parent, child_name, child, _ in _children(model):
        if isinstance(child, _Packed):
            setattr(parent, child_name, child.original)
            packed[id(child.original)] = child
    try:
        yield
    finally:
        for parent, child_name, child, _ in _children(model):
            if id(child) in packed:
                setattr(parent, child_name, packed[id(child)])


def _children(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module, str]]:
    """(parent, name, child, the child's full name) of every module under the transformers model."""
    return [(parent, child_name, child, f"{name}.{child_name}") for name, parent in unwrap(model).named_modules()
            for child_name, child in parent.named_children()]
