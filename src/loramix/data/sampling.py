"""Static mixing strategies (`data.mix`): how much of each source one epoch trains on.

'weights' keeps every training segment (`data.sources.<name>.weight` has already repeated a source);
'proportions' and 'temperature' first decide each source's share of the epoch's units (target tokens,
what the loss sees, or documents), then draw that many units from the source: without replacement while
the source holds enough, else every segment once per whole pass and a seeded part of one more pass (as
LLaMA-Factory's over-sampling, where TRL's `fraction` never repeats). Temperature sampling sets shares
proportional to size^(1/T), as in multilingual pretraining mixtures (XLM-R, mT5). The draw stops at the
segment that leaves the source nearest its target, so with segments short next to the budget each share is
met to well under 1% of the epoch.
"""

from __future__ import annotations

import numpy as np

from loramix.config import MixConfig
from loramix.data.packing import Segment


def mix_segments(segments: list[Segment], sources: list[str], mix: MixConfig, seed: int) -> tuple[list[Segment], dict]:
    """The epoch's training segments under `mix`, and per source what it got: documents, target tokens,
    their shares and the passes over the source's own segments ('epochs')."""
    src = np.array([s.source for s in segments], dtype=np.int64)
    tokens = np.array([s.n_targets for s in segments], dtype=np.float64)
    units = tokens if mix.unit == "tokens" else np.ones(len(segments))
    if mix.strategy == "weights":
        chosen = list(range(len(segments)))
    else:
        sizes = np.array([units[src == k].sum() for k in range(len(sources))])
        if mix.strategy == "proportions":
            shares = np.array([mix.proportions[name] for name in sources])
        else:
            shares = sizes ** (1 / mix.temperature)
            shares = shares / shares.sum()
        budget = mix.budget or sizes.sum()
        rng = np.random.default_rng([seed, 2])
        chosen = [i for k in range(len(sources)) for i in _draw(np.flatnonzero(src == k), units, shares[k] * budget, rng)]
    return [segments[i] for i in chosen], _report(chosen, src, tokens, units, sources)


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


def _report(chosen: list[int], src: np.ndarray, tokens: np.ndarray, units: np.ndarray, sources: list[str]) -> dict:
    """Per source: what it got, and its passes over its own segments counted in the mix's unit."""
    picked = np.array(chosen, dtype=np.int64)
    docs = np.bincount(src[picked], minlength=len(sources)) if len(picked) else np.zeros(len(sources), dtype=np.int64)
    toks = np.bincount(src[picked], weights=tokens[picked], minlength=len(sources)) if len(picked) else np.zeros(len(sources))
    got = np.bincount(src[picked], weights=units[picked], minlength=len(sources)) if len(picked) else np.zeros(len(sources))
    own = np.bincount(src, weights=units, minlength=len(sources))
    return {name: {"docs": int(docs[k]), "tokens": int(toks[k]), "share_docs": float(docs[k] / max(docs.sum(), 1)),
                   "share_tokens": float(toks[k] / max(toks.sum(), 1)), "epochs": float(got[k] / own[k]) if own[k] else 0.0}
            for k, name in enumerate(sources)}
