"""Token sequences -> packed rows -> batches with explicit document boundaries, and the epoch plan.

A row holds one or more segments (a document, or a piece of one). The collated batch carries, per
position, the segment it belongs to (0 = padding) and its position inside that segment, and per
position the *target*: the next token of the same segment, or -100. So the loss never needs to shift,
and no label can cross a document boundary or land on padding; the model masks attention to the
segment (block-diagonal causal) and positions restart at 0, so a packed document sees exactly what it
would see alone.

Packing is best-fit decreasing within a window of shuffled documents: deterministic for a seed, little
waste, and since windows follow the shuffled order, every part of an epoch still mixes the sources.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from loramix.data.tokens import TokenTable

IGNORE = -100


@dataclass(frozen=True, slots=True)
class Segment:
    source: int  # index into Mixture.sources
    tokens: np.ndarray  # int32 token ids, EOS included if the document ended inside this segment
    nbytes: np.ndarray | None = None  # int32 UTF-8 bytes of text per token (None: not counted)
    first_target: int = 1  # tokens before this one are context only (the prompt, with data.loss_on=completion)

    @property
    def n_targets(self) -> int:
        return max(0, len(self.tokens) - self.first_target)


Row = list[Segment]


@dataclass(frozen=True, eq=False)
class Segments:
    """A split's segments as columns over token stores, a few bytes each rather than a Python object each (at
    1M documents: ~30 MB, where `Segment` objects with their array views took ~300 MB): segment i is
    `length[i]` tokens of store `store[i]` from `start[i]`. Indexing builds the `Segment` of views into its
    store, as the rows being collated need them."""

    stores: tuple[TokenTable, ...]
    source: np.ndarray  # int64 index into Mixture.sources
    store: np.ndarray  # int64 index into `stores`
    start: np.ndarray  # int64 first token in its store
    length: np.ndarray  # int64 tokens
    first_target: np.ndarray  # int64, as Segment.first_target

    def __len__(self) -> int:
        return len(self.length)

    def __getitem__(self, i: int) -> Segment:
        store, a = self.stores[self.store[i]], int(self.start[i])
        b = a + int(self.length[i])
        return Segment(int(self.source[i]), store.ids[a:b], store.bytes[a:b], int(self.first_target[i]))

    def __iter__(self) -> Iterator[Segment]:
        return (self[i] for i in range(len(self)))

    def n_targets(self, index: np.ndarray | None = None) -> np.ndarray:
        """`Segment.n_targets` of the segments at `index` (all of them: None)."""
        length, first = (self.length, self.first_target) if index is None else (self.length[index], self.first_target[index])
        return np.maximum(length - first, 0)

    def take(self, index: np.ndarray) -> Segments:
        return Segments(self.stores, *(column[index] for column in (self.source, self.store, self.start, self.length, self.first_target)))

    @staticmethod
    def concat(parts: list[Segments]) -> Segments:
        base = np.cumsum([0] + [len(p.stores) for p in parts])
        columns = [np.concatenate([getattr(p, name) + (base[k] if name == "store" else 0) for k, p in enumerate(parts)]).astype(np.int64)
                   if parts else np.zeros(0, np.int64) for name in ("source", "store", "start", "length", "first_target")]
        return Segments(tuple(store for p in parts for store in p.stores), *columns)

    @staticmethod
    def of(segments: list[Segment]) -> Segments:
        """Segments held in memory (a store of their own), as the table the data stages make."""
        lengths = np.array([len(s.tokens) for s in segments], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.concatenate([s.tokens for s in segments]).astype(np.int32) if segments else np.zeros(0, np.int32)
        nbytes = np.concatenate([s.nbytes if s.nbytes is not None else np.zeros(len(s.tokens), np.int32) for s in segments]).astype(np.int32) \
            if segments else np.zeros(0, np.int32)
        store = TokenTable(ids, nbytes, offsets, np.ones(len(segments), np.int64), np.arange(len(segments)))
        return Segments((store,), np.array([s.source for s in segments], dtype=np.int64), np.zeros(len(segments), np.int64), offsets[:-1], lengths,
                        np.array([s.first_target for s in segments], dtype=np.int64))


@dataclass(frozen=True, eq=False)
class Rows:
    """Packed rows of `segments` as arrays: row r holds the segments order[at[r] : at[r + 1]]. Indexing gives
    the row's `Segment`s, slicing a `Rows`, so validation rows cost bytes, not objects, until collated."""

    segments: Segments
    order: np.ndarray  # int64 segment indices, row after row
    at: np.ndarray  # int64 row boundaries in `order`

    def __len__(self) -> int:
        return len(self.at) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            picked = np.arange(len(self))[k]
            sizes = self.at[picked + 1] - self.at[picked]
            at = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            return Rows(self.segments, self.order[np.repeat(self.at[picked] - at[:-1], sizes) + np.arange(at[-1])], at)
        return [self.segments[i] for i in self.order[self.at[k] : self.at[k + 1]]]

    def __iter__(self) -> Iterator[Row]:
        return (self[k] for k in range(len(self)))

    @property
    def n_segments(self) -> int:
        return len(self.order)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    position_ids: torch.Tensor  # (B, T) int64, restarts at 0 for every segment
    segment_ids: torch.Tensor  # (B, T) int64, 1..k per row, 0 on padding
    targets: torch.Tensor  # (B, T) int64, next token of the same segment or IGNORE
    target_source: torch.Tensor  # (B, T) int64, source id of each target, -1 where IGNORE
    target_bytes: torch.Tensor  # (B, T) int64, UTF-8 bytes of text each target stands for, 0 where IGNORE
    n_rows: int
    n_docs: int

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> Batch:
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """Page-locked host copies, so `.to(cuda)` is an asynchronous copy."""
        return Batch(**{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in vars(self).items()})


def make_segments(tokens: TokenTable, sources: np.ndarray, seq_len: int, long_docs: str, loss_on: str = "all") -> Segments:
    """Cut each document to `seq_len` tokens ('truncate': keep the head) or into pieces ('split'); a
    piece's targets start at its second token, or where the completion starts if that is later."""
    n, first = tokens.lengths, tokens.first_targets(loss_on)
    pieces = np.ones(len(n), np.int64) if long_docs == "truncate" else -(-n // seq_len)
    doc = np.repeat(np.arange(len(n)), pieces)
    offset = seq_len * (np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces))  # where each piece starts in its document
    return Segments((tokens,), np.asarray(sources, dtype=np.int64)[doc], np.zeros(len(doc), np.int64), tokens.starts[doc] + offset,
                    np.minimum(seq_len, n[doc] - offset), np.maximum(1, first[doc] - offset))


def best_fit_decreasing(lengths: np.ndarray, items: np.ndarray, seq_len: int) -> list[list[int]]:
    """Pack `items` (indices into `lengths`, each <= seq_len) into rows of at most seq_len tokens.

    Longest first, each into the row with the least room that still fits it (ties: the oldest row),
    so the result depends only on the input order.
    """
    order = sorted(items.tolist(), key=lambda i: -int(lengths[i]))  # stable: equal lengths keep input order
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row number)
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
            rows[r].append(i)
            bisect.insort(room, (free - n, r))
        else:
            rows.append([i])
            bisect.insort(room, (seq_len - n, len(rows) - 1))
    return rows


def pack(lengths: np.ndarray, order: np.ndarray, seq_len: int, window: int, rng: np.random.Generator | None) -> list[list[int]]:
    """Rows of segment indices: best-fit decreasing over consecutive windows of `order`.

    Rows of one window come out longest-first; `rng` reshuffles them so row order carries no length bias.
    """
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        packed = best_fit_decreasing(lengths, order[start : start + window], seq_len)
        if rng is not None:
            packed = [packed[j] for j in rng.permutation(len(packed))]
        rows += packed
    return rows


@dataclass(frozen=True)
class Batching:
    """How an epoch becomes optimizer steps (see `train.batch_unit`)."""

    packing: bool
    unit: str  # 'docs': micro_batch*grad_accum documents per step (the last may hold fewer); 'rows': that many packed rows
    micro_batch: int
    grad_accum: int
    seq_len: int
    window: int
    world: int = 1  # processes: each takes its share of every step

    @property
    def per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world


Step = list[list[list[int]]]  # micro-batches -> rows -> segment indices


@dataclass(frozen=True, eq=False)
class Steps:
    """Optimizer steps as arrays (a few bytes per document, where nested lists took ~70 MB an epoch at 1M
    documents): step s holds rows step_at[s] .. step_at[s + 1] - 1, row r the segments order[row_at[r] :
    row_at[r + 1]]. Indexing gives the `Step`; slicing (contiguous) a `Steps` over the same rows."""

    order: np.ndarray  # int64 segment indices, row after row
    row_at: np.ndarray  # int64 row boundaries in `order`
    step_at: np.ndarray  # int64 step boundaries, in rows
    micro_batch: int

    @staticmethod
    def of(groups: list[list[list[int]]], micro_batch: int) -> Steps:
        """From each step's rows."""
        return Steps(*_flat([row for group in groups for row in group]), np.cumsum([0] + [len(g) for g in groups], dtype=np.int64), micro_batch)

    def __len__(self) -> int:
        return len(self.step_at) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, stop, stride = k.indices(len(self))
            assert stride == 1, "Steps slices are contiguous"
            return replace(self, step_at=self.step_at[start : max(start, stop) + 1])
        return as_step([self.order[self.row_at[r] : self.row_at[r + 1]].tolist() for r in range(self.step_at[k], self.step_at[k + 1])], self.micro_batch)

    def __iter__(self) -> Iterator[Step]:
        return (self[k] for k in range(len(self)))

    @property
    def segments(self) -> np.ndarray:
        """Every segment index these steps take, in order (with repeats)."""
        return self.order[self.row_at[self.step_at[0]] : self.row_at[self.step_at[-1]]]

    @property
    def n_rows(self) -> int:
        return int(self.step_at[-1] - self.step_at[0])


def epoch_steps(lengths: np.ndarray, b: Batching, seed: int, epoch: int) -> Steps:
    """The epoch's optimizer steps, a pure function of (lengths, batching, seed, epoch).

    'docs': each step takes the next `per_step` documents of the shuffled order (the seed's step count,
    schedule and documents per step) and packs them best-fit among themselves. 'rows': the shuffled
    order is packed in windows of `window` documents and each step takes `per_step` rows (a fixed token
    budget). A micro-batch never holds more than `micro_batch` rows, so peak memory is that of the
    unpacked run.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not b.packing:
        rows = [[int(i)] for i in order]
        groups = [rows[s : s + b.per_step] for s in range(0, len(rows), b.per_step)]
    elif b.unit == "rows":
        rows = pack(lengths, order, b.seq_len, b.window, rng)
        groups = [rows[s : s + b.per_step] for s in range(0, len(rows), b.per_step)]
    else:
        # A step that ends at a row boundary holds "per_step on average" documents at best: on SmolLM2 with
        # 8 per step that made steps of 13 and then 1 document, and cost 0.002 nats of validation loss
        # against the Trainer's exact 8 (benchmarks/quality.py). Packing within the step costs a little fill.
        groups = [best_fit_decreasing(lengths, order[s : s + b.per_step], b.seq_len) for s in range(0, len(order), b.per_step)]
    return Steps.of(groups, b.micro_batch)


def as_step(rows: list[list[int]], micro_batch: int) -> Step:
    """One optimizer step's rows as micro-batches of at most `micro_batch` rows."""
    return [rows[k : k + micro_batch] for k in range(0, len(rows), micro_batch)]


def _flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of indices as arrays: the indices one after another, and each list's boundaries."""
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64), np.cumsum([0] + [len(x) for x in lists], dtype=np.int64)


def pack_eval_rows(segments: Segments, seq_len: int, packing: bool) -> Rows:
    """Validation rows: one best-fit pass over the whole set (order does not matter for the metrics)."""
    if not packing:
        return Rows(segments, np.arange(len(segments)), np.arange(len(segments) + 1))
    return Rows(segments, *_flat(best_fit_decreasing(segments.length, np.arange(len(segments)), seq_len)))


def collate(rows: Sequence[Row], pad_id: int) -> Batch:
    """Rows -> a right-padded batch as long as its longest row (padding to a fixed length only wastes work)."""
    rows = list(rows)
    T = max(sum(len(s.tokens) for s in row) for row in rows)
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    segment_ids = np.zeros((B, T), dtype=np.int64)
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    target_source = np.full((B, T), -1, dtype=np.int64)
    target_bytes = np.zeros((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for k, seg in enumerate(row, 1):
            n, f = len(seg.tokens), seg.first_target
            input_ids[b, t : t + n] = seg.tokens
            position_ids[b, t : t + n] = np.arange(n)
            segment_ids[b, t : t + n] = k
            # Position j predicts token j + 1: the targets are tokens f .. n-1, at positions f-1 .. n-2.
            targets[b, t + f - 1 : t + n - 1] = seg.tokens[f:]
            target_source[b, t + f - 1 : t + n - 1] = seg.source
            if seg.nbytes is not None:
                target_bytes[b, t + f - 1 : t + n - 1] = seg.nbytes[f:]
            t += n
    return Batch(
        *(torch.from_numpy(a) for a in (input_ids, position_ids, segment_ids, targets, target_source, target_bytes)),
        n_rows=B,
        n_docs=sum(len(r) for r in rows),
    )
