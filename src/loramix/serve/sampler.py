"""The sampler: every row's next token, each under its own settings and seeded generator, in one batch.

Shared by `loramix serve` and `loramix generate` (both run through the scheduler): repetition penalty as
transformers applies it, greedy at temperature 0, else temperature, top-k, top-p and one uniform draw from the
sequence's own generator, so a seeded row draws the same token alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loramix.errors import LoramixError


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        problems = [
            (self.max_new_tokens < 1, f"--max-new-tokens={self.max_new_tokens} must be >= 1"),
            (self.temperature < 0, f"--temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k < 0, f"--top-k={self.top_k} must be >= 0 (0 disables it)"),
            (not 0 < self.top_p <= 1, f"--top-p={self.top_p} must be in (0, 1]"),
            (self.repetition_penalty <= 0, f"--repetition-penalty={self.repetition_penalty} must be > 0"),
        ]
        bad = [msg for cond, msg in problems if cond]
        if bad:
            raise LoramixError("; ".join(bad))


class Row(Protocol):
    """What the sampler reads of a sequence; it seeds the generator on the row's first draw."""

    sampling: Sampling
    prompt: list[int]
    tokens: list[int]
    generator: torch.Generator | None


def sample_rows(logits: torch.Tensor, seqs: list[Row]) -> list[int]:
    """The next token of every row of `logits` (B, V), each under its sequence's own settings and generator:
    repetition penalty as transformers applies it, then greedy at temperature 0, else temperature, top-k and
    top-p, and one uniform draw from the sequence's generator (so a seeded row draws the same alone or batched)."""
    logits = _penalized(logits, seqs)
    maxima = _chunk_maxima(logits)
    drawn = [k for k, seq in enumerate(seqs) if seq.sampling.temperature > 0]
    tokens = _greedy(logits, maxima).tolist() if len(drawn) < len(seqs) else [0] * len(seqs)  # ~5 us a row: no need to pick the rows
    if drawn:
        for k, token in zip(drawn, _draw(logits, maxima, drawn, [seqs[k] for k in drawn])):
            tokens[k] = token
    return tokens


def _penalized(logits: torch.Tensor, seqs: list[Row]) -> torch.Tensor:
    """Logits of tokens already in a sequence (prompt or output) divided by its penalty (multiplied when negative)."""
    if all(seq.sampling.repetition_penalty == 1.0 for seq in seqs):
        return logits
    logits = logits.clone()
    for row, seq in zip(logits, seqs):
        penalty = seq.sampling.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(seq.prompt + seq.tokens, device=logits.device).unique()
            scores = row[seen]
            row[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def _draw(logits: torch.Tensor, maxima: torch.Tensor, rows: list[int], seqs: list[Row]) -> list[int]:
    """One token for each of `rows` of `logits` by inverse CDF in vocabulary order: the same draw picks the same
    token whether the row is sampled alone or among rows of other settings."""
    settings, device = [seq.sampling for seq in seqs], logits.device
    ids, logits = _candidates(logits, maxima, rows, [s.top_k for s in settings])
    probs = (logits / torch.tensor([s.temperature for s in settings], device=device)[:, None]).softmax(-1)
    nucleus = [k for k, s in enumerate(settings) if s.top_p < 1]
    if nucleus:
        probs[nucleus] = _nucleus(probs[nucleus], torch.tensor([settings[k].top_p for k in nucleus], device=device)[:, None])
    for seq in seqs:
        if seq.generator is None:
            seq.generator = torch.Generator(device).manual_seed(seq.sampling.seed)
    # u in (0, 1]: the first token whose cumulative mass reaches u * total has mass > 0
    u = 1 - torch.stack([torch.rand((), generator=seq.generator, device=device) for seq in seqs])
    cdf = probs.cumsum(-1)
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
    return (picks if ids is None else ids.gather(1, picks)).squeeze(1).tolist()


def _candidates(logits: torch.Tensor, maxima: torch.Tensor, rows: list[int], top_k: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`rows` of `logits` with each one's top-k applied (0: all tokens). When every row has a top-k, only the
    largest k columns are kept, in vocabulary order, with their token ids (b, k); else the ids are None (all, in
    order). Temperature comes later: it does not change which tokens are the largest."""
    vocab = logits.shape[-1]
    ks = [min(k, vocab) if k else vocab for k in top_k]
    ids = None
    if max(ks) < vocab:  # sampling needs only these columns: a softmax over (b, k) instead of (b, V)
        ids, values = _top(logits, maxima, rows, max(ks))
        ids, order = ids.sort(-1)
        logits = values.gather(1, order)
    else:
        logits = logits[rows]
    limited = [r for r, k in enumerate(ks) if k < logits.shape[-1]]
    if limited:
        k = torch.tensor([ks[r] for r in limited], device=logits.device)
        kth = logits[limited].topk(int(k.max())).values.gather(1, (k - 1)[:, None])  # each row's k-th largest
        logits[limited] = logits[limited].masked_fill(logits[limited] < kth, float("-inf"))
    return ids, logits


# Greedy and top-k read the vocabulary in chunks of this many columns: a maximum per chunk (one vectorized
# pass), then only the chunks that can hold the answer. torch's argmax and topk over a 50,257-token row take
# 40-80 us on this project's CPUs; this takes 10-20.
_CHUNK = 64


def _chunk_maxima(logits: torch.Tensor) -> torch.Tensor:
    """(B, ceil(V / _CHUNK)): each row's maximum over columns [c * _CHUNK, (c + 1) * _CHUNK)."""
    rows, vocab = logits.shape
    whole = vocab // _CHUNK * _CHUNK
    parts = [logits[:, :whole].reshape(rows, -1, _CHUNK).amax(-1)]
    if whole < vocab:
        parts.append(logits[:, whole:].amax(-1, keepdim=True))
    return torch.cat(parts, 1)


def _chunks(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` (B, V) as its whole chunks (B, V // _CHUNK, _CHUNK), a view, and the partial chunk after them (B, V % _CHUNK)."""
    rows, vocab = logits.shape
    whole = vocab // _CHUNK * _CHUNK
    return logits[:, :whole].view(rows, -1, _CHUNK), logits[:, whole:]


def _greedy(logits: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), ties to the first column as there: the first chunk holding a row's maximum, then the
    first column of that chunk, or of the partial chunk after the whole ones (read along with the last whole one,
    which comes first and cannot hold the maximum when the partial chunk is the first to)."""
    chunks, tail = _chunks(logits)
    if not chunks.shape[1]:  # a vocabulary under one chunk
        return tail.argmax(-1)
    at = maxima.argmax(-1).clamp(max=chunks.shape[1] - 1)
    k = torch.cat([chunks[torch.arange(len(at), device=at.device), at], tail], 1).argmax(-1)
    return torch.where(k < _CHUNK, at * _CHUNK + k, chunks.shape[1] * _CHUNK + k - _CHUNK)


def _top(logits: torch.Tensor, maxima: torch.Tensor, rows: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of the k largest logits of each of `rows` and those logits (b, k), as logits[rows].topk(k) finds
    them (in another order): among the whole chunks they lie in the k whose maxima are largest (k chunk maxima
    are k values of the row, so its k-th largest value is at least their k-th largest); the partial chunk is read whole."""
    chunks, tail = _chunks(logits)
    if k * _CHUNK * 4 > logits.shape[-1] or k > chunks.shape[1]:  # a wide top-k: few chunks to skip
        values, ids = logits[rows].topk(k)
        return ids, values
    at = torch.tensor(rows, device=logits.device)
    picked = maxima[at, : chunks.shape[1]].topk(k).indices  # (b, k)
    values, best = torch.cat([chunks[at[:, None], picked].flatten(1), tail[at]], 1).topk(k)  # of (b, k * _CHUNK + V % _CHUNK)
    chunk = picked.gather(1, (best // _CHUNK).clamp(max=k - 1))
    return torch.where(best < k * _CHUNK, chunk * _CHUNK + best % _CHUNK, chunks.shape[1] * _CHUNK + best - k * _CHUNK), values


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`probs` (B, V) with all but each row's nucleus zeroed: its fewest most likely tokens whose mass reaches
    top_p (B, 1). The nucleus is sought among the top 64, 512, ... tokens, so the vocabulary is sorted
    whole only for a row whose nucleus is that wide (a flat distribution)."""
    k, vocab = 64, probs.shape[-1]
    while True:
        ordered, order = probs.topk(min(k, vocab))  # (B, k), descending
        if k >= vocab or bool((ordered.sum(-1, keepdim=True) >= top_p).all()):
            break
        k *= 8
    beyond = ordered.cumsum(-1) - ordered >= top_p  # the mass before them reaches top_p already; the first always stays
    return torch.zeros_like(probs).scatter(1, order, ordered.masked_fill(beyond, 0.0))
