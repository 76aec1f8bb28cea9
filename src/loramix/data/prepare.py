"""Run the data stages in order: sources -> mixture/split -> tokens -> rows."""

from __future__ import annotations

from dataclasses import dataclass

from loramix.config import DataConfig
from loramix.data.mixture import Mixture, build_mixture
from loramix.data.packing import Row, Segment, make_segments, one_per_row
from loramix.data.tokens import tokenize_documents


@dataclass
class Prepared:
    mixture: Mixture
    train_rows: list[Row]
    val_rows: list[Row]


def prepare_data(data: DataConfig, tokenizer, log=print) -> Prepared:
    """Everything up to rows: what training and `loramix eval` both need, built the same way."""
    if data.local_dir == "@demo":
        from loramix.data.demo import ensure_demo_data

        data = _with_local_dir(data, str(ensure_demo_data(data.cache_dir)))
    log("data:")
    mixture = build_mixture(data, log)
    src_id = {name: i for i, name in enumerate(mixture.sources)}

    def rows(docs) -> list[Row]:
        tokens = tokenize_documents(docs, tokenizer, data.cache_dir, log)
        segments: list[Segment] = make_segments(tokens, [src_id[d.source] for d in docs], data.seq_len, data.long_docs)
        return one_per_row(segments)

    return Prepared(mixture, rows(mixture.train), rows(mixture.val))


def _with_local_dir(data: DataConfig, local_dir: str) -> DataConfig:
    from dataclasses import replace

    return replace(data, local_dir=local_dir)
