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
from dataclasses import dataclass

import numpy as np
import torch

from loramix.data.tokens import Tokens

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


def make_segments(tokens: list[Tokens], sources: list[int], seq_len: int, long_docs: str, loss_on: str = "all") -> list[Segment]:
    """Cut each document to `seq_len` tokens ('truncate': keep the head) or into pieces ('split'); a
    piece's targets start at its second token, or where the completion starts if that is later."""
    out = []
    for toks, src in zip(tokens, sources):
        first = toks.first_target(loss_on)
        starts = [0] if long_docs == "truncate" else range(0, len(toks.ids), seq_len)
        out += [Segment(src, toks.ids[i : i + seq_len], toks.bytes[i : i + seq_len], max(1, first - i)) for i in starts]
    return out


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


def epoch_steps(lengths: np.ndarray, b: Batching, seed: int, epoch: int) -> list[Step]:
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
    return [as_step(g, b) for g in groups]


def as_step(rows: list[list[int]], b: Batching) -> Step:
    """One optimizer step's rows as micro-batches of at most `micro_batch` rows."""
    return [rows[k : k + b.micro_batch] for k in range(0, len(rows), b.micro_batch)]


def pack_eval_rows(segments: list[Segment], seq_len: int, packing: bool) -> list[Row]:
    """Validation rows: one best-fit pass over the whole set (order does not matter for the metrics)."""
    if not packing:
        return [[s] for s in segments]
    lengths = np.array([len(s.tokens) for s in segments])
    return [[segments[i] for i in row] for row in best_fit_decreasing(lengths, np.arange(len(segments)), seq_len)]


def collate(rows: list[Row], pad_id: int) -> Batch:
    """Rows -> a right-padded batch as long as its longest row (padding to a fixed length only wastes work)."""
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
