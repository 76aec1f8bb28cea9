"""Mixing strategies (`data.mix`): how much of each source trains.

'weights' keeps every training segment (`data.sources.<name>.weight` has already repeated a source);
'proportions' and 'temperature' first decide each source's share of the epoch's units (target tokens,
what the loss sees, or documents), then draw that many units from the source: without replacement while
the source holds enough, else every segment once per whole pass and a seeded part of one more pass (as
LLaMA-Factory's over-sampling, where TRL's `fraction` never repeats). Temperature sampling sets shares
proportional to size^(1/T), as in multilingual pretraining mixtures (XLM-R, mT5). The draw stops at the
segment that leaves the source nearest its target, so with segments short next to the budget each share is
met to well under 1% of the epoch.

'adaptive' keeps every segment as the pool and draws each optimizer step's documents one at a time from the
source furthest below its current share (`Steered`), each source read in its own seeded shuffled passes;
every data.mix.every steps `reweight` moves the shares from the per-source training losses the loop summed.
The draw is a pure function of (shares, how many segments each source has given so far), which the loop
keeps in its checkpointed state: a resumed or multi-process run draws the same steps.
"""

from __future__ import annotations

import bisect

import numpy as np

from loramix.config import MixConfig
from loramix.data.packing import Batching, Segments, Step, as_step, best_fit_decreasing
from loramix.records import SourceMix


def mix_segments(segments: Segments, sources: list[str], mix: MixConfig, seed: int) -> tuple[Segments, dict[str, SourceMix]]:
    """The epoch's training segments under `mix`, and per source what it got: documents, target tokens,
    their shares and the passes over the source's own segments ('epochs')."""
    src, tokens = segments.source, segments.n_targets().astype(np.float64)
    units = tokens if mix.unit == "tokens" else np.ones(len(segments))
    if mix.strategy in ("weights", "adaptive"):
        chosen = np.arange(len(segments))
    else:
        sizes = np.array([units[src == k].sum() for k in range(len(sources))])
        if mix.strategy == "proportions":
            shares = np.array([mix.proportions[name] for name in sources])
        else:
            shares = sizes ** (1 / mix.temperature)
            shares = shares / shares.sum()
        budget = mix.budget or sizes.sum()
        rng = np.random.default_rng([seed, 2])
        chosen = np.array([i for k in range(len(sources)) for i in _draw(np.flatnonzero(src == k), units, shares[k] * budget, rng)], dtype=np.int64)
    return segments.take(chosen), _report(chosen, src, tokens, units, sources)


def _draw(members: np.ndarray, units: np.ndarray, want: float, rng: np.random.Generator) -> list[int]:
    """Indices from `members` whose units add up nearest `want`: whole shuffled passes, then part of one."""
    out: list[int] = []
    total = 0.0
    while len(members) and units[members].sum() > 0:
        for i in rng.permutation(members):
            if total + units[i] - want > want - total:  # taking it would land further from the target
                return out
            out.append(int(i))
            total += units[i]
    return out


def _report(picked: np.ndarray, src: np.ndarray, tokens: np.ndarray, units: np.ndarray, sources: list[str]) -> dict[str, SourceMix]:
    """Per source: what it got, and its passes over its own segments counted in the mix's unit."""
    docs = np.bincount(src[picked], minlength=len(sources)) if len(picked) else np.zeros(len(sources), dtype=np.int64)
    toks = np.bincount(src[picked], weights=tokens[picked], minlength=len(sources)) if len(picked) else np.zeros(len(sources))
    got = np.bincount(src[picked], weights=units[picked], minlength=len(sources)) if len(picked) else np.zeros(len(sources))
    own = np.bincount(src, weights=units, minlength=len(sources))
    return {name: SourceMix(docs=int(docs[k]), tokens=int(toks[k]), share_docs=float(docs[k] / max(docs.sum(), 1)),
                            share_tokens=float(toks[k] / max(toks.sum(), 1)), epochs=float(got[k] / own[k]) if own[k] else 0.0)
            for k, name in enumerate(sources)}


def start_state(mix: MixConfig, sources: list[str], segments: Segments) -> dict:
    """An adaptive run's state before its first step: the shares data.mix.proportions gives, else each
    source's share of the pool; no segment taken, no loss seen."""
    if mix.proportions:
        shares = [float(mix.proportions[name]) for name in sources]
    else:
        units = segments.n_targets() if mix.unit == "tokens" else np.ones(len(segments))
        sizes = np.bincount(segments.source, weights=units, minlength=len(sources))
        shares = (sizes / sizes.sum()).tolist()
    return {"weights": shares, "raw": shares, "taken": [0] * len(sources), "running": [None] * len(sources)}


class Steered:
    """An adaptive run's steps: documents drawn one at a time from the source whose units (target tokens or
    documents) lag furthest behind its share since the shares last changed, in the spirit of smooth weighted
    round-robin, so each interval meets its shares to within one document per source. With
    train.batch_unit=docs a step takes micro_batch x grad_accum documents and packs them best-fit; with
    'rows' it fills that many rows, each draw from the most-behind source whose next document still fits."""

    def __init__(self, segments: Segments, n_sources: int, b: Batching, unit: str, seed: int):
        self.lengths = segments.length
        self.units = segments.n_targets().astype(np.float64) if unit == "tokens" else np.ones(len(segments))
        self.members = [np.flatnonzero(segments.source == k) for k in range(n_sources)]
        self.b, self.seed = b, seed
        self._passes: dict[tuple[int, int], np.ndarray] = {}

    def steps(self, weights: list[float], taken: list[int], n: int) -> tuple[list[Step], list[int]]:
        """The next `n` steps under `weights`, given how many segments each source gave so far; and those
        counts after them."""
        taken, got = list(taken), np.zeros(len(self.members))
        return [self._step(np.asarray(weights), taken, got) for _ in range(n)], taken

    def _head(self, k: int, taken: list[int]) -> int:
        """Source k's next segment: its position in the source's current shuffled pass."""
        members = self.members[k]
        p, i = divmod(taken[k], len(members))
        if (k, p) not in self._passes:
            self._passes[(k, p)] = np.random.default_rng([self.seed, 3, k, p]).permutation(members)
        return int(self._passes[(k, p)][i])

    def _pick(self, weights: np.ndarray, taken: list[int], got: np.ndarray, fits=None) -> int | None:
        """The source furthest behind its share (ties: the larger share, then the first), among those whose
        next segment `fits`; None when none does."""
        behind = weights * got.sum() - got
        for k in sorted((k for k in range(len(got)) if len(self.members[k]) and weights[k] > 0), key=lambda k: (-behind[k], -weights[k], k)):
            if fits is None or fits(self.lengths[self._head(k, taken)]):
                return k
        return None

    def _take(self, k: int, taken: list[int], got: np.ndarray) -> int:
        i = self._head(k, taken)
        taken[k] += 1
        got[k] += self.units[i]
        return i

    def _step(self, weights: np.ndarray, taken: list[int], got: np.ndarray) -> Step:
        b = self.b
        if b.unit == "docs" or not b.packing:
            items = np.array([self._take(self._pick(weights, taken, got), taken, got) for _ in range(b.per_step)])
            rows = best_fit_decreasing(self.lengths, items, b.seq_len) if b.packing else [[int(i)] for i in items]
            return as_step(rows, b.micro_batch)
        rows: list[list[int]] = [[] for _ in range(b.per_step)]
        room = [(b.seq_len, r) for r in range(b.per_step)]  # sorted (free tokens, row)
        while (k := self._pick(weights, taken, got, lambda n: n <= room[-1][0])) is not None:
            i = self._take(k, taken, got)
            free, r = room.pop(bisect.bisect_left(room, (int(self.lengths[i]), -1)))  # best fit: the fullest row it fits in
            rows[r].append(i)
            bisect.insort(room, (free - int(self.lengths[i]), r))
        return as_step([row for row in rows if row], b.micro_batch)


def reweight(mix: MixConfig, sources: list[str], state: dict, nll: np.ndarray, targets: np.ndarray) -> dict:
    """The adaptive state after one interval, from its summed training NLL and target tokens per source:
    `running` (each source's smoothed loss), `raw` (the method's weights) and `weights` (the shares drawn from).

    Each source's loss estimate blends the interval's mean with the previous estimate (data.mix.smoothing; a
    source without tokens keeps its last). Then:
      worst, or a list of sources: Group DRO's exponentiated-gradient ascent on the per-group losses (Sagawa et
        al. 2020, "Distributionally Robust Neural Networks", Algorithm 1; DoReMi, Xie et al. 2023, applies the
        same update to excess losses): raw_k <- raw_k exp(step * loss_k), normalized; the weights keep moving
        while a source stays behind, toward the minimax mixture. A source outside a given list counts as
        one nat ahead of the list's least-behind source, so its weight drains, gradually, to the floor.
      average: online data mixing (Albalak et al. 2023, "Efficient Online Data Mixing for Language Model
        Pre-Training"), EXP3 with each source's loss as its reward: raw_k proportional to exp(step * loss_k) of
        the current estimates, a standing tilt toward the harder sources that follows them as they change.
    The shares drawn from are DoReMi's smoothing of `raw` with the uniform mixture, (1 - S floor) raw + floor,
    so every share stays at or above data.mix.floor; `raw` itself is not smoothed, so equal losses leave the
    mixture where it is rather than drifting to uniform. (DoReMi's excess loss against a reference model is not
    used: with the base as the reference every source's excess is negative after the first steps, and its
    clip at 0 would freeze the weights.)
    """
    seen = targets > 0
    now = np.where(seen, nll / np.maximum(targets, 1), np.nan)
    last = np.array([np.nan if r is None else r for r in state["running"]])
    est = np.where(np.isnan(last), now, np.where(seen, mix.smoothing * last + (1 - mix.smoothing) * now, last))
    if np.isnan(est).all():
        return state
    est = np.where(np.isnan(est), np.nanmean(est), est)  # a source not seen yet: as the average of the others
    if mix.objective == ["average"]:
        raw = np.exp(mix.step * (est - est.max()))
    else:
        goal = [sources.index(n) for n in mix.objective] if mix.objective != ["worst"] else list(range(len(sources)))
        signal = np.full(len(sources), est[goal].min() - 1)
        signal[goal] = est[goal]
        raw = np.asarray(state["raw"]) * np.exp(mix.step * (signal - signal.max()))  # shifted: the same once normalized, never overflows
    raw = raw / raw.sum()
    floor = floor_of(mix, len(sources))
    return {**state, "running": est.tolist(), "raw": raw.tolist(), "weights": ((1 - len(sources) * floor) * raw + floor).tolist()}


def floor_of(mix: MixConfig, n_sources: int) -> float:
    return mix.floor if mix.floor is not None else 0.5 / n_sources
