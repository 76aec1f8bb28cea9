"""Tokenize documents once: EOS appended, no truncation (that depends on seq_len), cached on disk.

The cache key covers the tokenizer's vocabulary and every text, so a changed source, cap, split or
tokenizer can never reuse stale tokens; the same data on a second run skips tokenization entirely.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from loramix.data.sources import Document
from loramix.errors import LoramixError
from loramix.files import replacing


def tokenize_documents(docs: list[Document], tokenizer, cache_dir: str, log=print) -> list[np.ndarray]:
    """Token ids (int32) of each document followed by EOS, aligned with `docs`; duplicates share work."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LoramixError("the tokenizer has no EOS token; pick a model whose tokenizer defines one")
    keys = list(dict.fromkeys((d.source, d.row) for d in docs))
    text_of = {(d.source, d.row): d.text for d in docs}
    texts = [text_of[k] for k in keys]
    path = Path(cache_dir).expanduser() / "tokens" / f"{_cache_key(tokenizer, texts)}.npz"
    if path.is_file():
        with np.load(path) as z:
            flat, offsets = z["flat"], z["offsets"]
        log(f"  tokens: {len(texts)} documents from cache {path.name}")
    else:
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids + [eos], dtype=np.int32) for e in encodings]
        offsets = np.cumsum([0] + [len(a) for a in ids])
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        _save_atomic(path, flat=flat, offsets=offsets)
        log(f"  tokens: {len(texts)} documents tokenized, {len(flat):,} tokens (cached)")
    by_key = {k: flat[offsets[i] : offsets[i + 1]] for i, k in enumerate(keys)}
    return [by_key[(d.source, d.row)] for d in docs]


def _cache_key(tokenizer, texts: list[str]) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:32]


def _save_atomic(path: Path, **arrays) -> None:
    """A cache file is either complete or absent: a killed run never leaves a torn one behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        np.savez(tmp, **arrays)
