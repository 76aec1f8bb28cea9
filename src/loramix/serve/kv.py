"""The batch's KV cache: every layer's keys and values (B, H, L, D), views of buffers with room for more rows and
columns.

transformers' DynamicLayer appends a decode step's column by copying the whole cache into a new tensor (torch.cat).
At 16 rows of the tiny model (benchmarks/serve.py) those copies and their fresh allocations cost ~0.4 ms of a
5.6 ms step, more than the attention. Here a step writes its column into the room kept at the end; rows joining
the batch are written into its room for rows (only they are copied); rows leaving are replaced by the batch's last
rows (only those move), and the leading columns no row needs any more are left out of the views. Buffers are
reallocated only when a room runs out. Fresh memory is most of what a copy costs on this project's machines: each
new page faults at its first touch. At SmolLM2-135M's shape, 16 clients arriving a few at a time, the joins and
departures of one benchmark level copied ~1.1 GB into new buffers, and 0.6-0.9 s of a 25-29 s level went to them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Columns of room a layer keeps past its last: a copy every 64 decode steps, ~3 MB more a row at SmolLM2-135M's shape.
_ROOM = 64


class _Growing(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are the views [:rows, :, start:end] of longer buffers; anything
    that replaces them (a crop, transformers' own selection of rows) is copied into new buffers at the next update."""

    _views: tuple[torch.Tensor, torch.Tensor] | None = None
    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _start = _end = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        rows, new = len(key_states), key_states.shape[-2]
        if not self._fits(rows, 0, new):
            self._reserve(max(rows, len(self._buffers[0]) if self._buffers else 0), key_states, 0, new + _ROOM)
        for buffer, states in zip(self._buffers, (key_states, value_states)):
            buffer[:rows, :, self._end : self._end + new] = states
        self._hold(rows, self._start, self._end + new)
        return self.keys, self.values

    def _fits(self, rows: int, before: int, after: int) -> bool:
        """Whether the views are still this layer's and its buffers have room for `rows` rows, `before` columns
        before the views' first and `after` past their last."""
        return (self._views is not None and self._views[0] is self.keys and rows <= len(self._buffers[0])
                and before <= self._start and self._end + after <= self._buffers[0].shape[-2])

    def _reserve(self, rows: int, like: torch.Tensor, before: int, after: int) -> None:
        """New buffers for `rows` rows (heads, head size and dtype those of `like`), holding the keys and values so
        far (if any) after `before` columns, with `after` more columns of room."""
        had = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
        self._buffers = tuple(like.new_empty(rows, like.shape[1], before + had + after, like.shape[-1]) for _ in range(2))
        if had:
            for buffer, old in zip(self._buffers, (self.keys, self.values)):
                buffer[: len(old), :, before : before + had] = old
        self._hold(len(self.keys) if had else 0, before, before + had)

    def _hold(self, rows: int, start: int, end: int) -> None:
        """Keys and values: rows [:rows] and columns [start:end] of the buffers."""
        self.device, self.is_initialized, self._start, self._end = self._buffers[0].device, True, start, end
        self.keys, self.values = self._views = tuple(buffer[:rows, :, start:end] for buffer in self._buffers)


def cache() -> DynamicCache:
    """An empty cache whose layers grow in place."""
    out = DynamicCache()
    out.layer_class_to_replicate = _Growing
    return out


@torch.inference_mode()  # the buffers were made in the forwards' inference mode: only it writes them
def join(batch: DynamicCache, new: DynamicCache, width: int, most_rows: int) -> None:
    """Append `new`'s rows to `batch`'s, every row right-aligned in `width` columns (those before a row's own
    zeroed: masked), in the room of `batch`'s buffers when they have it (only `new`'s rows are copied), else in new
    ones with room for twice the rows (at most `most_rows`)."""
    for layer, part in zip(batch.layers, new.layers):
        rows, had = len(layer.keys), layer.keys.shape[-2]
        needed = rows + len(part.keys)
        if not layer._fits(needed, width - had, 0):
            layer._reserve(max(needed, min(2 * needed, most_rows)), layer.keys, width - had, _ROOM)
        start, end = layer._end - width, layer._end
        for buffer, states in zip(layer._buffers, (part.keys, part.values)):
            buffer[:rows, :, start : layer._start] = 0  # the batch's rows, when `new` is wider
            buffer[rows:needed, :, start : end - states.shape[-2]] = 0
            buffer[rows:needed, :, end - states.shape[-2] : end] = states
        layer._hold(needed, start, end)


def compact(keep: list[int]) -> list[int]:
    """The rows `keep` of a batch in the order that `select` moves fewest of: each row leaving from among the first
    len(keep) gives its place to a kept row from past them."""
    kept, movers = set(keep), iter(k for k in keep if k >= len(keep))
    return [k if k in kept else next(movers) for k in range(len(keep))]


@torch.inference_mode()
def select(cache: DynamicCache, order: list[int], cut: int) -> None:
    """Keep the rows `order` (from `compact`) of every layer, less its first `cut` columns: the rows that change
    place are moved within the buffers (a layer whose views were replaced is indexed, and copied at its next update)."""
    moves = [(k, row) for k, row in enumerate(order) if k != row]
    in_place = all(row >= len(order) for _, row in moves)  # no row moves onto one still to be read
    for layer in cache.layers:
        if in_place and layer._fits(len(order), 0, 0):
            for buffer in layer._buffers:
                for k, row in moves:
                    buffer[k, :, layer._start + cut : layer._end] = buffer[row, :, layer._start + cut : layer._end]
            layer._hold(len(order), layer._start + cut, layer._end)
        else:
            index = torch.tensor(order, device=layer.keys.device)
            layer.keys, layer.values = layer.keys[index, :, cut:], layer.values[index, :, cut:]
