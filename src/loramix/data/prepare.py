"""Run the data stages in order: sources -> mixture/split -> tokens -> rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loramix.config import DataConfig, SourceConfig
from loramix.data.mixture import Mixture, build_mixture
from loramix.data.packing import Row, Segment, make_segments, pack_eval_rows
from loramix.data.sources import load_documents
from loramix.data.tokens import tokenize_documents


@dataclass
class Prepared:
    mixture: Mixture
    train: list[Segment]  # the training loop packs these anew every epoch
    val_rows: list[Row]  # packed once: the metrics do not depend on the order
    outside: list[str] = field(default_factory=list)  # held-out sources for the forgetting check
    outside_rows: list[Row] = field(default_factory=list)

    @property
    def train_lengths(self) -> np.ndarray:
        return np.array([len(s.tokens) for s in self.train])


def prepare_data(data: DataConfig, tokenizer, log=print, outside: dict[str, SourceConfig] | None = None) -> Prepared:
    """Everything up to rows: what training and `loramix eval` both need, built the same way."""
    if data.local_dir == "@demo":
        from loramix.data.demo import ensure_demo_data

        data = _with_local_dir(data, str(ensure_demo_data(data.cache_dir)))
    log("data:")
    mixture = build_mixture(data, log)
    src_id = {name: i for i, name in enumerate(mixture.sources)}

    def segments(docs) -> list[Segment]:
        tokens = tokenize_documents(docs, tokenizer, data.cache_dir, log)
        return make_segments(tokens, [src_id[d.source] for d in docs], data.seq_len, data.long_docs)

    prepared = Prepared(mixture, segments(mixture.train), pack_eval_rows(segments(mixture.val), data.seq_len, data.packing))
    if outside:
        prepared.outside = list(outside)
        docs = [d for name, spec in outside.items()
                for d in load_documents(name, spec, data, spec.cap if spec.cap is not None else data.cap)]
        log(f"  held out for the forgetting check: {', '.join(f'{n} {sum(d.source == n for d in docs)}' for n in outside)}")
        tokens = tokenize_documents(docs, tokenizer, data.cache_dir, log)
        ids = [prepared.outside.index(d.source) for d in docs]
        prepared.outside_rows = pack_eval_rows(make_segments(tokens, ids, data.seq_len, data.long_docs), data.seq_len, data.packing)
    return prepared


def _with_local_dir(data: DataConfig, local_dir: str) -> DataConfig:
    from dataclasses import replace

    return replace(data, local_dir=local_dir)
