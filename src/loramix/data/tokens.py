"""Tokenize documents once: the tokenizer's BOS where it adds one, the text, EOS; no truncation (that
depends on seq_len); cached on disk.

Besides the ids, every token carries the UTF-8 bytes of the text it covers (from the tokenizer's
character offsets; an added BOS or EOS covers none, a character split into several byte tokens is
counted once), so bits per byte count exactly the bytes of the text scored, whatever the tokenizer:
byte-level BPE with its leading-space marks, SentencePiece with byte fallback, special tokens. A
document with a prompt also records where its completion starts, for `data.loss_on=completion`.

The cache key covers the tokenizer's vocabulary, every text and prompt, and the chat formatting, so a
changed source, cap, split or tokenizer can never reuse stale tokens.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramix.data.sources import Document
from loramix.errors import LoramixError
from loramix.files import replacing

_VERSION = 2  # bump when what is cached changes


@dataclass(frozen=True)
class Tokens:
    ids: np.ndarray  # int32: [BOS] text EOS
    bytes: np.ndarray  # int32, per token: UTF-8 bytes of the text it covers; they sum to the text's bytes
    completion: int  # index of the first token after the prompt (1 when the document has none)

    def first_target(self, loss_on: str) -> int:
        """The first token that is a target: the second (the first has no context), or with
        loss_on='completion' the first token of the completion."""
        return max(1, self.completion) if loss_on == "completion" else 1


def tokenize_documents(docs: list[Document], tokenizer, cache_dir: str, log=print, chat: bool = False) -> list[Tokens]:
    """Tokens of each document, aligned with `docs`; duplicates share work. With `chat`, documents that
    have a prompt are formatted through the tokenizer's chat template (user: prompt, assistant: the rest)."""
    if tokenizer.eos_token_id is None:
        raise LoramixError("the tokenizer has no EOS token; pick a model whose tokenizer defines one")
    keys = list(dict.fromkeys((d.source, d.row) for d in docs))
    doc_of = {(d.source, d.row): d for d in docs}
    texts = [_as_text(doc_of[k], tokenizer, chat) for k in keys]
    path = Path(cache_dir).expanduser() / "tokens" / f"{_cache_key(tokenizer, texts)}.npz"
    arrays = _read_cache(path, len(texts), log)
    if arrays is not None:
        log(f"  tokens: {len(texts)} documents from cache {path.name}")
    else:
        arrays = _encode(texts, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:  # a killed run never leaves a torn cache file
            np.savez(tmp, **arrays)
        log(f"  tokens: {len(texts)} documents tokenized, {len(arrays['ids']):,} tokens (cached)")
    at = arrays["offsets"]
    by_key = {k: Tokens(arrays["ids"][at[i] : at[i + 1]], arrays["bytes"][at[i] : at[i + 1]], int(arrays["completion"][i]))
              for i, k in enumerate(keys)}
    return [by_key[(d.source, d.row)] for d in docs]


def _read_cache(path: Path, n_docs: int, log) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when there is no cache file or it is damaged (then it is rebuilt, and the
    log says so). The npz is a zip whose members carry CRC-32s, so flipped bytes fail the read too."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("ids", "bytes", "offsets", "completion")}
        offsets = arrays["offsets"]
        if len(offsets) != n_docs + 1 or offsets[-1] != len(arrays["ids"]) or len(arrays["bytes"]) != len(arrays["ids"]):
            raise ValueError("the arrays do not fit together")
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log(f"  tokens: cache file {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); tokenizing again")
        return None


def _as_text(doc: Document, tokenizer, chat: bool) -> tuple[str, int, bool]:
    """(text, prompt characters, whether the tokenizer adds its own BOS) for one document."""
    if not (chat and doc.prompt):
        return doc.text, doc.prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise LoramixError("data.chat_template=true, but the tokenizer has no chat template; set data.chat_template=false")
    user = [{"role": "user", "content": doc.text[: doc.prompt]}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": doc.text[doc.prompt :].lstrip()}], tokenize=False)
    if not full.startswith(head):
        raise LoramixError(f"source '{doc.source}': the chat template writes the prompt differently with an answer; set data.chat_template=false")
    return full, len(head), False  # the template writes its own BOS


def _encode(texts: list[tuple[str, int, bool]], tokenizer) -> dict[str, np.ndarray]:
    bos = _added_prefix(tokenizer)
    encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _, _ in texts], add_special_tokens=False)
    ids, nbytes, completion = [], [], []
    for (text, prompt, add_bos), e in zip(texts, encodings):
        prefix = bos if add_bos else []
        ends = [end for _, end in e.offsets] + [len(text)]  # EOS belongs to the completion
        ids.append(np.asarray(prefix + e.ids + [tokenizer.eos_token_id], dtype=np.int32))
        nbytes.append(np.asarray([0] * len(prefix) + _covered_bytes(text, e.offsets) + [0], dtype=np.int32))
        completion.append(len(prefix) + next(j for j, end in enumerate(ends) if end > prompt or j == len(ends) - 1))
    return {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int32), "bytes": np.concatenate(nbytes) if nbytes else np.zeros(0, np.int32),
            "offsets": np.cumsum([0] + [len(a) for a in ids]), "completion": np.asarray(completion, dtype=np.int64)}


def _covered_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes per token: each token takes the characters after the previous token's end up to its
    own end (offsets may skip the space a byte-level token stands for, and byte-fallback tokens of
    one character share its span); the last token takes what is left."""
    out, done = [], 0
    for _, end in offsets:
        out.append(len(text[done:end].encode("utf-8")) if end > done else 0)
        done = max(done, end)
    if out:
        out[-1] += len(text[done:].encode("utf-8"))
    return out


def _added_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (its BOS, if it adds one)."""
    bare = tokenizer.backend_tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True).ids
    return next((full[:k] for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), [])


def _cache_key(tokenizer, texts: list[tuple[str, int, bool]]) -> str:
    h = hashlib.sha256(f"v{_VERSION}".encode())
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token_id, _added_prefix(tokenizer))).encode())
    for text, prompt, add_bos in texts:
        h.update(hashlib.sha256(f"{prompt}:{add_bos}:{text}".encode()).digest())
    return h.hexdigest()[:32]
