"""Token sequences -> rows -> batches with explicit document boundaries.

A row holds one or more segments (a document, or a piece of one). The collated batch carries, per
position, the segment it belongs to (0 = padding) and its position inside that segment, and per
position the *target*: the next token of the same segment, or -100. So the loss never needs to shift,
and no label can cross a document boundary or land on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass(frozen=True)
class Segment:
    source: int  # index into Mixture.sources
    tokens: np.ndarray  # int32 token ids, EOS included if the document ended inside this segment


Row = list[Segment]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    position_ids: torch.Tensor  # (B, T) int64, restarts at 0 for every segment
    segment_ids: torch.Tensor  # (B, T) int64, 1..k per row, 0 on padding
    targets: torch.Tensor  # (B, T) int64, next token of the same segment or IGNORE
    target_source: torch.Tensor  # (B, T) int64, source id of each target, -1 where IGNORE
    n_rows: int
    n_docs: int

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> Batch:
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return Batch(**moved)


def make_segments(tokens: list[np.ndarray], sources: list[int], seq_len: int, long_docs: str) -> list[Segment]:
    """Cut each document to `seq_len` tokens ('truncate': keep the head) or into pieces ('split')."""
    out = []
    for toks, src in zip(tokens, sources):
        if long_docs == "truncate" or len(toks) <= seq_len:
            out.append(Segment(src, toks[:seq_len]))
        else:
            out += [Segment(src, toks[i : i + seq_len]) for i in range(0, len(toks), seq_len)]
    return out


def one_per_row(segments: list[Segment]) -> list[Row]:
    return [[s] for s in segments]


def collate(rows: list[Row], pad_id: int) -> Batch:
    """Rows -> a right-padded batch as long as its longest row (padding to a fixed length only wastes work)."""
    T = max(sum(len(s.tokens) for s in row) for row in rows)
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    segment_ids = np.zeros((B, T), dtype=np.int64)
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    target_source = np.full((B, T), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for k, seg in enumerate(row, 1):
            n = len(seg.tokens)
            input_ids[b, t : t + n] = seg.tokens
            position_ids[b, t : t + n] = np.arange(n)
            segment_ids[b, t : t + n] = k
            targets[b, t : t + n - 1] = seg.tokens[1:]
            target_source[b, t : t + n - 1] = seg.source
            t += n
    return Batch(
        *(torch.from_numpy(a) for a in (input_ids, position_ids, segment_ids, targets, target_source)),
        n_rows=B,
        n_docs=sum(len(r) for r in rows),
    )


def batches(rows: list[Row], batch_size: int, pad_id: int) -> list[Batch]:
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
