"""Mixture: per-source caps and weights, a stratified held-out split, and the manifest that proves it.

Each source is sampled (seeded) and split on its own, so every source is in validation in its own
share. Weights act on the training side only: the validation set always measures each source as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from loramix.config import DataConfig
from loramix.data.sources import Documents, JsonListDigest, read_source, source_path
from loramix.errors import LoramixError
from loramix.records import Manifest, MixEntry, SourceEntry


@dataclass
class Mixture:
    sources: list[str]  # a document's source id is its index here
    manifest: Manifest


@dataclass
class SourceSplit:
    """One source read, capped and split: its held-out documents, its training documents with the weight
    applied, and its manifest entry."""

    name: str
    train: Documents
    val: Documents
    manifest: SourceEntry


def split_sources(data: DataConfig, log=print) -> Iterator[SourceSplit]:
    """Each source in turn, so a caller that tokenizes one before reading the next holds one source's texts at a time."""
    for index, (name, spec) in enumerate(data.sources.items()):
        cap = data.cap_for(spec)
        read = read_source(name, spec, data, cap)
        docs = read.documents
        n_val = max(1, round(len(docs) * data.val_share))
        if len(docs) - n_val < 1:
            raise LoramixError(f"source '{name}' has {len(docs)} usable row(s): too few to hold out {data.val_share:.0%} for validation; add rows or drop "
                               "the source")
        # Documents arrive in seeded random order, so the head is a random held-out sample.
        src_val, src_train = docs.take(slice(0, n_val)), docs.take(slice(n_val, None))
        weighted = _apply_weight(src_train, spec.weight, np.random.default_rng([data.seed, index, 1]))
        path = source_path(name, spec, data)
        entry = SourceEntry(origin=str(path) if path else f"{spec.hub_id}:{spec.subset or ''}:{spec.split}", revision=read.revision,
                            template=spec.template, cap=cap, selected=len(docs), train=len(src_train), val=len(src_val), weight=spec.weight,
                            train_weighted=len(weighted), train_ids_sha256=_hash(src_train.rows.tolist()),
                            val_ids_sha256=_hash(src_val.rows.tolist()), text_sha256=read.text_sha256)
        log(f"  {name:<18} train {len(src_train):>6}  val {len(src_val):>5}  (from {entry.origin})")
        yield SourceSplit(name, weighted, src_val, entry)


def manifest_of(data: DataConfig, entries: dict[str, SourceEntry], mix: MixEntry | None = None) -> Manifest:
    """The mixture's manifest: the split's seed and share, each source's entry and what the mix gave it."""
    return Manifest(seed=data.seed, val_share=data.val_share, sources=entries, mix=mix)


def _apply_weight(docs: Documents, weight: float, rng: np.random.Generator) -> Documents:
    """Repeat the documents int(weight) times plus a seeded fraction; weight 1.0 is the identity."""
    whole, frac = divmod(weight, 1.0)
    extra = np.sort(rng.choice(len(docs), size=round(frac * len(docs)), replace=False)) if frac else np.zeros(0, np.int64)
    return docs.take(np.concatenate([np.tile(np.arange(len(docs)), int(whole)), extra]))


def _hash(items: list) -> str:
    """SHA-256 of json.dumps(items, ensure_ascii=False)."""
    digest = JsonListDigest()
    for item in items:
        digest.add(item)
    return digest.hexdigest()
