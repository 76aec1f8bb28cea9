"""The packed-weight kernel: large linear layers through oneDNN on weights packed once, and an LM head's single row
through MKL on its weight stored (in, out), for generation on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loramix.model import unwrap


class _Packed(torch.nn.Module):
    """A linear layer's matmul through oneDNN on a copy of its weight packed once (inference only). The
    Parameters stay as they were: tied embeddings, the state dict, the fingerprint and PEFT (which reads a base
    layer's weight, e.g. for DoRA) still see them."""

    def __init__(self, layer: torch.nn.Module, weight: torch.Tensor, packed_from: int, columns: bool):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.__dict__["original"] = layer  # not a submodule: for `unpacked` and fewer rows, outside the state dict
        self.packed_from = packed_from  # rows (tokens) from which the packed kernel is the faster
        # packed for 16 rows: any hint of 4 or more measured the same from 1 to 32 rows, a hint of 1 was slower everywhere
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)  # (out, in); a plain attribute
        # Below packed_from rows: the layer's own forward, or with `columns` MKL's gemv over a copy of the weight stored (in, out)
        self.columns = weight.detach().t().contiguous() if columns else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.packed_from * x.shape[-1]:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.columns is None:
            return self.original(x)
        y = x @ self.columns
        return y if self.bias is None else y + self.bias


# Rows (tokens) from which oneDNN's packed kernel beats MKL's, by the layer's weights (one thread, this project's
# CPUs, us for 1 / 2 / 16 rows, MKL against packed): MKL's call is cheaper for one row of a small layer (128 x 384:
# 7 against 21; 576 x 576: 20 against 31), but from 2 rows MKL takes a slow path on these AMD CPUs (576 x 576: 40
# against 34, 156 against 74 at 16; 576 x 1,536: 442 against 170 at 16) and from ~1M weights packing wins at one row
# too (896 x 4,864: 1,025 against 298). Under 64K weights (GPT-2's width 128 attention) MKL is as fast up to ~32 rows.
_PACKED_FROM = ((1 << 20, 1), (192 << 10, 2), (64 << 10, 16))  # (at least this many weights, packed from this many rows)

# An nn.Linear at least this many times wider out than in (an LM head; no MLP is) is packed from 2 rows and keeps its weight
# stored (in, out) for one row, which MKL's gemv reads at full speed where the packed kernel and MKL's over (out, in) do not
# (one thread, ms for 1 / 2 rows, (in, out) against packed against F.linear): GPT-2's head at width 128, 0.87 / 1.7 against
# 2.0 / 2.3 against 3.4 / 6.7; SmolLM2-135M's (576 x 49,152) 5.7 / 11.8 against 9.5 / 11.4 against 10.4 / 23; GPT-2
# 124M's 9.4 / 18.2 against 17.7 / 17.3 against 15.3 / 31.7; Qwen2-0.5B's (896 x 151,936) 34 / 59 against 55 / 55 against 50 / 99.
_COLUMNS_FROM = 16


def pack_linears(model) -> int:
    """Run the model's linear layers (nn.Linear, GPT-2's Conv1D, the LM head; not LoRA's own) through oneDNN with
    their weights packed, for generation on CPU in fp32, from the rows where that is faster (_PACKED_FROM); returns
    how many it packed.

    MKL's kernels for the few rows of a decode step are slow on this project's AMD CPUs, most of all for the
    (out, in) weight of an nn.Linear. One thread: GPT-2's 50,257-token head at width 128 takes 6.5 ms for 16 rows
    through MKL, 2.9 packed; a Qwen2-0.5B-sized MLP projection (896 -> 4,864) 0.88 and 3.1 ms for one row and 16,
    0.54 and 1.6 packed. One row of an LM head runs best through MKL on its weight stored (in, out) (_COLUMNS_FROM).
    The cost is a second copy of each packed weight in memory (GPT-2 124M: +0.5 GB, SmolLM2-135M: +0.5 GB) and a third
    of the head's (+154 MB, +113 MB). Left alone: layers under 64K weights, on another device or in another dtype, other
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
        head = type(child) is torch.nn.Linear and weight.shape[0] >= _COLUMNS_FROM * weight.shape[1]  # (Conv1D's own layout is (in, out))
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and rows:
            found.append((parent, child_name, child, weight, 2 if head else rows, head))
    for parent, child_name, child, weight, rows, head in found:
        setattr(parent, child_name, _Packed(child, weight, rows, head))
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
