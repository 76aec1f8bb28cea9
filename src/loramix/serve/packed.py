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

    def __init__(self, layer: torch.nn.Module, weight: torch.Tensor, packed_from: int):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.__dict__["original"] = layer  # not a submodule: for `unpacked` and fewer rows, outside the state dict
        self.packed_from = packed_from  # rows (tokens) from which the packed kernel is the faster
        # packed for 16 rows: any hint of 4 or more measured the same from 1 to 32 rows, a hint of 1 was slower everywhere
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)  # (out, in); a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.packed_from * x.shape[-1]:
            return self.original(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# Rows (tokens) from which oneDNN's packed kernel beats MKL's, by the layer's weights (one thread, this project's
# CPUs, us for 1 / 2 / 16 rows, MKL against packed): MKL's call is cheaper for one row of a small layer (128 x 384:
# 7 against 21; 576 x 576: 20 against 31), but from 2 rows MKL takes a slow path on these AMD CPUs (576 x 576: 40
# against 34, 156 against 74 at 16; 576 x 1,536: 442 against 170 at 16) and from ~1M weights packing wins at one row
# too (896 x 4,864: 1,025 against 298). Under 64K weights (GPT-2's width 128 attention) MKL is as fast up to ~32 rows.
_PACKED_FROM = ((1 << 20, 1), (192 << 10, 2), (64 << 10, 16))  # (at least this many weights, packed from this many rows)


def pack_linears(model) -> int:
    """Run the model's linear layers (nn.Linear, GPT-2's Conv1D, the LM head; not LoRA's own) through oneDNN with
    their weights packed, for generation on CPU in fp32, from the rows where that is faster (_PACKED_FROM); returns
    how many it packed.

    MKL's kernels for the few rows of a decode step are slow on this project's AMD CPUs, most of all for the
    (out, in) weight of an nn.Linear. One thread: GPT-2's 50,257-token head at width 128 takes 3.3 ms for one row
    and 6.5 for 16 through MKL, 1.0 and 2.9 packed; a Qwen2-0.5B-sized MLP projection (896 -> 4,864) 0.88 and 3.1
    ms, 0.54 and 1.6 packed. The cost is a second copy of each packed weight in memory (GPT-2 124M: +0.5 GB,
    SmolLM2-135M: +0.5 GB). Left alone: layers under 64K weights, on another device or in another dtype, other
    module types.
    """
    from transformers.pytorch_utils import Conv1D

    if not torch.backends.mkldnn.is_available():
        return 0
    found = []
    for parent, child_name, child, path in _children(model):
        if "lora_" in path or type(child) not in (torch.nn.Linear, Conv1D):
            continue
        weight = child.weight if type(child) is torch.nn.Linear else child.weight.t()  # Conv1D keeps (in, out)
        rows = next((rows for least, rows in _PACKED_FROM if weight.numel() >= least), None)
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and rows:
            found.append((parent, child_name, child, weight, rows))
    for parent, child_name, child, weight, rows in found:
        setattr(parent, child_name, _Packed(child, weight, rows))
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
