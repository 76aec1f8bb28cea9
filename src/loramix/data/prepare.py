"""Run the data stages in order: sources -> mixture/split -> tokens -> rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loramix.config import DataConfig, SourceConfig
from loramix.data.mixture import Mixture, manifest_of, split_sources
from loramix.data.packing import Rows, Segments, make_segments, pack_eval_rows
from loramix.data.sampling import floor_of, mix_segments
from loramix.data.sources import Documents, read_source
from loramix.data.tokens import tokenize_documents
from loramix.records import MixEntry, SourceMix


@dataclass
class Prepared:
    mixture: Mixture
    train: Segments  # the training loop packs these anew every epoch
    val_rows: Rows  # packed once: the metrics do not depend on the order
    forgetting_sources: list[str] = field(default_factory=list)  # never trained on: the forgetting check
    forgetting_rows: Rows | None = None


def prepare_data(data: DataConfig, tokenizer, log=print, forgetting_sources: dict[str, SourceConfig] | None = None) -> Prepared:
    """Everything up to rows: what training and `loramix eval` both need, built the same way."""
    if data.local_dir == "@demo":
        from loramix.data.demo import ensure_demo_data

        data = _with_local_dir(data, str(ensure_demo_data(data.cache_dir)))
    log("data:")
    sources, entries, train, val = list(data.sources), {}, [], []
    for split in split_sources(data, log):  # source by source, each tokenized a chunk of texts at a time
        entries[split.name] = split.manifest
        train.append(_segments(split.train, sources, tokenizer, data, log))
        val.append(_segments(split.val, sources, tokenizer, data, log))
    train, mixed = mix_segments(Segments.concat(train), sources, data.mix, data.seed)
    mixture = Mixture(sources, manifest_of(data, entries, MixEntry(data.mix.strategy, data.mix.unit, mixed)))
    _log_mix(mixed, data, log)
    prepared = Prepared(mixture, train, pack_eval_rows(Segments.concat(val), data.seq_len, data.packing))
    if forgetting_sources:
        prepared.forgetting_sources = list(forgetting_sources)
        docs = [read_source(name, spec, data, data.cap_for(spec)).documents for name, spec in forgetting_sources.items()]
        log(f"  forgetting sources (never trained on): {', '.join(f'{d.source} {len(d)}' for d in docs)}")
        segments = Segments.concat([_segments(d, prepared.forgetting_sources, tokenizer, data, log) for d in docs])
        prepared.forgetting_rows = pack_eval_rows(segments, data.seq_len, data.packing)
    return prepared


def _log_mix(mixed: dict[str, SourceMix], data: DataConfig, log) -> None:
    """Each source's share of the epoch's documents and target tokens, and how many passes over it that is."""
    mix = data.mix
    log(f"  mix ({mix.strategy}" + (f", by {mix.unit}" if mix.strategy != "weights" else "") + "): share of documents / tokens, passes"
        + (" of the pool" if mix.strategy == "adaptive" else ""))
    for name, m in mixed.items():
        log(f"  {name:<18} {100 * m.share_docs:>5.1f}% / {100 * m.share_tokens:>5.1f}%  x{m.epochs:.2f}  ({m.docs:,} docs, {m.tokens:,} tokens)")
    if mix.strategy == "adaptive":
        start = "data.mix.proportions" if mix.proportions else "these shares"
        log(f"  adaptive: from {start}, every {mix.every} steps toward {', '.join(mix.objective)} (step {mix.step:g}, floor {floor_of(mix, len(mixed)):.3g}, "
            f"smoothing {mix.smoothing:g}); the weights are logged as 'mix' rows")


def _segments(docs: Documents, sources: list[str], tokenizer, data: DataConfig, log) -> Segments:
    """One source's documents -> token segments of at most seq_len, each tagged with the source's index in `sources`."""
    tokens = tokenize_documents(docs, tokenizer, data.cache_dir, log, chat=data.chat_template, workers=data.workers)
    return make_segments(tokens, np.full(len(docs), sources.index(docs.source)), data.seq_len, data.long_docs, data.loss_on)


def _with_local_dir(data: DataConfig, local_dir: str) -> DataConfig:
    from dataclasses import replace

    return replace(data, local_dir=local_dir)
