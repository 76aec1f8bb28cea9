"""Mixture: per-source caps and weights, a stratified held-out split, and the manifest that proves it.

Each source is sampled (seeded) and split on its own, so every source is in validation in its own
share. Weights act on the training side only: the validation set always measures each source as is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from loramix.config import DataConfig
from loramix.data.sources import Document, read_source, source_path
from loramix.errors import LoramixError


@dataclass
class Mixture:
    sources: list[str]  # a document's source id is its index here
    train: list[Document]
    val: list[Document]
    manifest: dict


def build_mixture(data: DataConfig, log=print) -> Mixture:
    """Load every source, cap, split per source, apply weights; return documents and the manifest."""
    train, val, manifest = [], [], {}
    for name, spec in data.sources.items():
        cap = data.cap_for(spec)
        read = read_source(name, spec, data, cap)
        docs = read.documents
        n_val = max(1, round(len(docs) * data.val_share))
        if len(docs) - n_val < 1:
            raise LoramixError(f"source '{name}' has {len(docs)} usable row(s): too few to hold out {data.val_share:.0%} for validation; add rows or drop "
                               "the source")
        # Documents arrive in seeded random order, so the head is a random held-out sample.
        src_val, src_train = docs[:n_val], docs[n_val:]
        weighted = _apply_weight(src_train, spec.weight, np.random.default_rng([data.seed, len(manifest), 1]))
        path = source_path(name, spec, data)
        manifest[name] = {
            "origin": str(path) if path else f"{spec.hub_id}:{spec.subset or ''}:{spec.split}",
            "revision": read.revision,
            "template": spec.template,
            "cap": cap,
            "selected": len(docs),
            "train": len(src_train),
            "val": len(src_val),
            "weight": spec.weight,
            "train_weighted": len(weighted),
            "train_ids_sha256": _hash([d.row for d in src_train]),
            "val_ids_sha256": _hash([d.row for d in src_val]),
            "text_sha256": _hash([d.text for d in docs]),
        }
        log(f"  {name:<18} train {len(src_train):>6}  val {len(src_val):>5}  (from {manifest[name]['origin']})")
        train += weighted
        val += src_val
    return Mixture(list(data.sources), train, val, {"seed": data.seed, "val_share": data.val_share, "sources": manifest})


def _apply_weight(docs: list[Document], weight: float, rng: np.random.Generator) -> list[Document]:
    """Repeat the list int(weight) times plus a seeded fraction; weight 1.0 is the identity."""
    whole, frac = divmod(weight, 1.0)
    extra = rng.choice(len(docs), size=round(frac * len(docs)), replace=False) if frac else []
    return docs * int(whole) + [docs[i] for i in sorted(extra)]


def _hash(items: list) -> str:
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
