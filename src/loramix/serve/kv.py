"""The batch's KV cache: every layer's keys and values (B, H, L, D) in buffers with room for more columns.

transformers' DynamicLayer appends a decode step's column by copying the whole cache into a new tensor
(torch.cat). At 16 rows of the tiny model (benchmarks/serve.py) those copies and their fresh allocations cost
~0.4 ms of a 5.6 ms step, more than the attention. Here a step writes its column into the room kept at the end,
and a layer's cache is copied only once every _ROOM columns.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Columns of room a layer keeps past its last: a copy every 64 decode steps, ~3 MB more a row at SmolLM2-135M's shape.
_ROOM = 64


class _Growing(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are views of longer buffers; anything that replaces them
    (a crop, a selection of rows) is copied into new buffers at the next update."""

    _views: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        had = 0 if self.keys is None else self.keys.shape[-2]
        now = had + key_states.shape[-2]
        grown = self._views is not None and self._views[0] is self.keys and now <= self._buffers[0].shape[-2]
        if not grown:
            self._buffers = tuple(_with_room(old, new, now) for old, new in ((self.keys, key_states), (self.values, value_states)))
        for buffer, new in zip(self._buffers, (key_states, value_states)):
            buffer[:, :, had:now] = new
        self._hold(self._buffers, now)
        return self.keys, self.values

    def _hold(self, buffers: tuple[torch.Tensor, torch.Tensor], columns: int) -> None:
        """Keys and values: the first `columns` columns of `buffers`."""
        self.device, self.is_initialized, self._buffers = buffers[0].device, True, buffers
        self.keys, self.values = self._views = tuple(buffer[:, :, :columns] for buffer in buffers)


def _with_room(old: torch.Tensor | None, new: torch.Tensor, columns: int) -> torch.Tensor:
    """A buffer for `columns` columns and _ROOM more, holding `old`'s columns first."""
    buffer = new.new_empty(*new.shape[:2], columns + _ROOM, new.shape[-1])
    if old is not None:
        buffer[:, :, : old.shape[-2]] = old
    return buffer


def cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A cache whose layers grow in place, empty or holding `layers` ((keys, values) per layer, taken as they
    are: they are copied into buffers with room at the first update)."""
    out = DynamicCache()
    out.layer_class_to_replicate = _Growing
    for keys, values in layers or ():
        layer = _Growing()
        layer.keys, layer.values, layer.device, layer.is_initialized = keys, values, keys.device, True
        out.layers.append(layer)
    return out


def join(caches: list[DynamicCache], width: int) -> DynamicCache:
    """Batches' caches as one, their rows in turn, each batch's columns the last of `width` (those before them
    zero: masked), written straight into buffers with room (padding and concatenating first copied them twice more)."""
    out = cache()
    for parts in zip(*(c.layers for c in caches)):
        layer = _Growing()
        layer._hold(tuple(_stacked([getattr(p, kind) for p in parts], width) for kind in ("keys", "values")), width)
        out.layers.append(layer)
    return out


def _stacked(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """`tensors` (B_i, H, L_i, D) one after another in a buffer of `width` columns and _ROOM more, each right-aligned."""
    first = tensors[0]
    buffer = first.new_empty(sum(len(t) for t in tensors), first.shape[1], width + _ROOM, first.shape[-1])
    row = 0
    for t in tensors:
        pad = width - t.shape[-2]
        buffer[row : row + len(t), :, :pad] = 0
        buffer[row : row + len(t), :, pad:width] = t
        row += len(t)
    return buffer
