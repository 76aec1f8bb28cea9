"""Tokenize documents once: the tokenizer's BOS where it adds one, the text, EOS; no truncation (that
depends on seq_len); cached on disk.

Besides the ids, every token carries the UTF-8 bytes of the text it covers (from the tokenizer's
character offsets; an added BOS or EOS covers none, a character split into several byte tokens is
counted once), so bits per byte count exactly the bytes of the text scored, whatever the tokenizer:
byte-level BPE with its leading-space marks, SentencePiece with byte fallback, special tokens. A
document with a prompt also records where its completion starts, for `data.loss_on=completion`.

The cache key covers the tokenizer's vocabulary, every text (its SHA-256, taken when the source was read)
and prompt, and the chat formatting, so a changed source, cap, split or tokenizer can never reuse stale
tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramix.data.sources import Document, Documents
from loramix.errors import LoramixError
from loramix.files import remove_orphans, replacing, write_json

_VERSION = 4  # bump when what is cached, or how it is keyed, changes
_CHUNK = 4096  # documents per encode_batch call
_CHUNK_CHARS = 1 << 20  # and characters: the Rust encodings take ~40 bytes per character (4M: +420 MB on cnn_dailymail, 1M: +170 MB)


@dataclass(frozen=True, slots=True)
class Tokens:
    ids: np.ndarray  # int32: [BOS] text EOS
    bytes: np.ndarray  # int32, per token: UTF-8 bytes of the text it covers; they sum to the text's bytes
    completion: int  # index of the first token after the prompt (1 when the document has none)

    def first_target(self, loss_on: str) -> int:
        """The first token that is a target: the second (the first has no context), or with
        loss_on='completion' the first token of the completion."""
        return max(1, self.completion) if loss_on == "completion" else 1


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Documents' tokens as arrays over a store: document k (in the order asked for) is the store's document
    `row[k]`, tokens ids[offsets[row[k]] : offsets[row[k] + 1]]. No Python object per document: indexing
    builds a `Tokens` of views when one is wanted."""

    ids: np.ndarray  # int32, every document's tokens one after another (memory-mapped from the cache)
    bytes: np.ndarray  # int32, per token
    offsets: np.ndarray  # int64, per store document and one past the last
    completion: np.ndarray  # int64, per store document
    row: np.ndarray  # int64, per document asked for: its store document

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, k: int) -> Tokens:
        r = int(self.row[k])
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        return Tokens(self.ids[a:b], self.bytes[a:b], int(self.completion[r]))

    def __iter__(self) -> Iterator[Tokens]:
        return (self[k] for k in range(len(self)))

    @property
    def starts(self) -> np.ndarray:
        return self.offsets[self.row]

    @property
    def lengths(self) -> np.ndarray:
        return self.offsets[self.row + 1] - self.offsets[self.row]

    def first_targets(self, loss_on: str) -> np.ndarray:
        """`Tokens.first_target` of every document."""
        return np.maximum(1, self.completion[self.row]) if loss_on == "completion" else np.ones(len(self.row), np.int64)


def tokenize_documents(docs: Documents, tokenizer, cache_dir: str, log=print, chat: bool = False, workers: int = 1) -> TokenTable:
    """Tokens of each document, aligned with `docs`; a document repeated (a source's weight) is tokenized
    once. With `chat`, documents that have a prompt are formatted through the tokenizer's chat template
    (user: prompt, assistant: the rest). On a cache miss the texts are rendered a chunk at a time for
    `workers` threads to tokenize side by side (the Rust tokenizer drops the GIL)."""
    if tokenizer.eos_token_id is None:
        raise LoramixError("the tokenizer has no EOS token; pick a model whose tokenizer defines one")
    unique, row = _first_occurrences(docs.rows)
    distinct = docs.take(unique)
    path = Path(cache_dir).expanduser() / "tokens" / _cache_key(tokenizer, distinct, chat)
    store = _open_store(path, len(distinct), log)
    if store is not None:
        log(f"  tokens: {len(distinct)} documents from cache {path.name}")
    else:
        texts = (_as_text(d, tokenizer, chat) for chunk in distinct.chunks() for d in chunk)
        _write_store(path, texts, len(distinct), tokenizer, workers)
        store = _open_store(path, len(distinct), log, verify=False)  # just written: its checksums were computed from these bytes
        log(f"  tokens: {len(distinct)} documents tokenized, {len(store['ids']):,} tokens (cached)")
    return TokenTable(store["ids"], store["bytes"], store["offsets"], store["completion"], row)


def _first_occurrences(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the position of each distinct row's first occurrence, in order; each position's index among them)."""
    values, inverse = np.unique(rows, return_inverse=True)
    first = np.full(len(values), len(rows), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(rows)))
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values))
    return first[order], rank[inverse]


# The store: ids and bytes as raw int32 files, memory-mapped on open (the corpus stays on disk, and the OS
# pages in what a batch reads), with the small per-document arrays and a CRC-32 of every file in meta.json.
_RAW = ("ids", "bytes")
_SMALL = ("offsets", "completion")


def _write_store(path: Path, texts: Iterator[tuple[str, int, bool]], n_docs: int, tokenizer, workers: int) -> None:
    """Tokenize into a store directory a chunk at a time: memory holds one chunk's encodings, never the
    corpus. Written as a temporary sibling renamed into place, so a killed run leaves no torn store."""
    bos = np.asarray(_added_prefix(tokenizer), dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)  # what a preparation killed midway left
    with replacing(path) as tmp:
        tmp.mkdir()
        crc, offsets, completion, done = dict.fromkeys(_RAW, 0), [np.zeros(1, np.int64)], [], 0
        with (tmp / "ids.bin").open("wb") as f_ids, (tmp / "bytes.bin").open("wb") as f_bytes:
            for chunk in _encoded(texts, tokenizer, bos, workers):
                for name, f in (("ids", f_ids), ("bytes", f_bytes)):
                    raw = chunk[name].tobytes()
                    f.write(raw)
                    crc[name] = zlib.crc32(raw, crc[name])
                offsets.append(chunk["offsets"][1:] + done)
                completion.append(chunk["completion"])
                done += int(chunk["offsets"][-1])
        small = {"offsets": np.concatenate(offsets), "completion": np.concatenate(completion) if completion else np.zeros(0, np.int64)}
        for name, array in small.items():
            np.save(tmp / f"{name}.npy", array)
            crc[name] = zlib.crc32((tmp / f"{name}.npy").read_bytes())
        write_json(tmp / "meta.json", {"version": _VERSION, "docs": n_docs, "tokens": done, "crc32": crc})


def _encoded(texts: Iterator[tuple[str, int, bool]], tokenizer, bos: np.ndarray, workers: int) -> Iterator[dict[str, np.ndarray]]:
    """`_encode_chunk` of each chunk in order. The tokenizer encodes the next `workers` chunks in threads (its
    Rust code drops the GIL) while this one's texts are rendered and its arrays built and written. The seed's
    dry run on 80k documents (24M tokens), 2 cores: 31 s with 2 threads, 44 s with the tokenizer's own thread
    pool instead (whose idle workers spin: 65 s of CPU against 45), 60 s on one thread."""
    chunks = _chunks(texts)
    with ThreadPoolExecutor(workers) as pool:
        # Twice as many chunks queued as threads: one finishing never waits for this thread to render the next.
        ahead = deque((chunk, pool.submit(_tokenize, chunk, tokenizer)) for chunk in itertools.islice(chunks, 2 * workers))
        while ahead:
            chunk, encodings = ahead.popleft()
            following = next(chunks, None)
            if following is not None:
                ahead.append((following, pool.submit(_tokenize, following, tokenizer)))
            yield _encode_chunk(chunk, encodings.result(), tokenizer, bos)


def _tokenize(texts: list[tuple[str, int, bool]], tokenizer):
    return tokenizer.backend_tokenizer.encode_batch([t for t, _, _ in texts], add_special_tokens=False)


def _chunks(texts: Iterator[tuple[str, int, bool]]) -> Iterator[list[tuple[str, int, bool]]]:
    """Consecutive chunks of at most _CHUNK documents and, past its first document, at most _CHUNK_CHARS
    characters (the per-character arrays of `_encode_chunk` stay small on long articles)."""
    chunk, chars = [], 0
    for text in texts:
        if chunk and (len(chunk) == _CHUNK or chars + len(text[0]) > _CHUNK_CHARS):
            yield chunk
            chunk, chars = [], 0
        chunk.append(text)
        chars += len(text[0])
    if chunk:
        yield chunk


def _open_store(path: Path, n_docs: int, log, verify: bool = True) -> dict[str, np.ndarray] | None:
    """The store's arrays (ids and bytes memory-mapped), or None when there is none or it is damaged (then
    it is rebuilt, and the log says so): every file's CRC-32 (with `verify`) and size are checked on open."""
    if not path.is_dir():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name in (*_RAW, *_SMALL) if verify else ():
            file = path / (f"{name}.bin" if name in _RAW else f"{name}.npy")
            if _crc32(file) != meta["crc32"][name]:
                raise ValueError(f"{file.name} fails its checksum")
        # Plain ndarray views of the maps: a document's slice is a light view, not a memmap object.
        store = {name: np.memmap(path / f"{name}.bin", dtype=np.int32, mode="r").view(np.ndarray) if meta["tokens"] else np.zeros(0, np.int32)
                 for name in _RAW}
        store.update({name: np.load(path / f"{name}.npy") for name in _SMALL})
        if meta["docs"] != n_docs or len(store["offsets"]) != n_docs + 1 or not store["offsets"][-1] == len(store["ids"]) == meta["tokens"]:
            raise ValueError("its arrays do not fit together")
        return store
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        log(f"  tokens: cache {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); tokenizing again")
        return None


def _crc32(file: Path) -> int:
    """CRC-32 of a file read in blocks (not mapped: checking a large store does not grow this process)."""
    crc = 0
    with file.open("rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


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


def _encode_chunk(texts: list[tuple[str, int, bool]], encodings, tokenizer, bos: np.ndarray) -> dict[str, np.ndarray]:
    """One chunk: [BOS] text EOS per document. A token's bytes are those of the characters after the furthest
    end any earlier token of its document reached, up to its own end (offsets may skip the space a byte-level
    token stands for, and byte-fallback tokens of one character share its span); the last text token also
    takes what is left of the text. Computed over the chunk's texts joined, with UTF-8 byte positions per
    character from their code points."""
    n = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=int(n.sum()))
    spans = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets) for e in encodings), dtype=np.int64,
                        count=2 * int(n.sum())).reshape(-1, 2)
    doc = np.repeat(np.arange(len(texts)), n)
    chars = np.array([len(t) for t, _, _ in texts], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(chars)])  # each text's first character in the joined string
    joined = "".join(t for t, _, _ in texts)
    if joined.isascii():  # one byte per character
        byte_at = np.arange(len(joined) + 1, dtype=np.int64)
    else:
        points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        width = np.ones(len(points) + 1, dtype=np.uint8)  # UTF-8 bytes of each character (the first entry: position 0)
        width[0] = 0
        for limit in (0x80, 0x800, 0x10000):
            width[1:] += points >= limit
        byte_at = np.cumsum(width, dtype=np.int64)  # byte position of each character position
    end = start[doc] + spans[:, 1]
    reach = np.maximum.accumulate(end) if len(end) else end  # the furthest end so far, this token included
    before = np.maximum(start[doc], np.concatenate([[0], reach[:-1]]))  # earlier documents never reach past this one's start
    covered = np.where(end > before, byte_at[end] - byte_at[np.minimum(before, end)], 0)
    first = np.concatenate([[0], np.cumsum(n)])
    has = n > 0
    last_reach = np.where(has, reach[np.maximum(first[1:] - 1, 0)], start[:-1]) if len(reach) else start[:-1]
    covered[first[1:][has] - 1] += byte_at[start[1:]][has] - byte_at[np.maximum(last_reach, start[:-1])][has]
    # Completion: the first token whose reach passes the prompt (the EOS when none does).
    prompt = np.array([p for _, p, _ in texts], dtype=np.int64)
    passed = np.bincount(doc, weights=reach <= (start[:-1] + prompt)[doc], minlength=len(texts)).astype(np.int64)
    prefix = np.array([len(bos) if add else 0 for _, _, add in texts], dtype=np.int64)
    size = prefix + n + 1
    at = np.concatenate([[0], np.cumsum(size)])
    out_ids = np.empty(at[-1], dtype=np.int32)
    out_bytes = np.zeros(at[-1], dtype=np.int32)
    body = np.repeat(at[:-1] + prefix, n) + (np.arange(int(n.sum())) - np.repeat(first[:-1], n))
    out_ids[body], out_bytes[body] = ids, covered
    out_ids[at[1:] - 1] = tokenizer.eos_token_id
    for k in range(len(bos)):  # BOS ids cover no text
        out_ids[at[:-1][prefix > 0] + k] = bos[k]
    return {"ids": out_ids, "bytes": out_bytes, "offsets": at, "completion": prefix + np.minimum(passed, n)}


def _added_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (its BOS, if it adds one)."""
    bare = tokenizer.backend_tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True).ids
    return next((full[:k] for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), [])


def _tokenizer_digest(tokenizer) -> bytes:
    """What of the tokenizer decides the tokens: its vocabulary, EOS and added prefix. Hashed once per
    tokenizer (sorting a 50k-entry vocabulary for each of a mixture's 16 splits cost seconds)."""
    cached = _DIGESTS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        h = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr((tokenizer.eos_token_id, _added_prefix(tokenizer))).encode())
        cached = _DIGESTS[id(tokenizer)] = (tokenizer, h.digest())
    return cached[1]


_DIGESTS: dict[int, tuple[object, bytes]] = {}


def _cache_key(tokenizer, docs: Documents, chat: bool) -> str:
    """What decides the tokens: the tokenizer, the chat formatting and every document's prompt length and text
    digest, in order."""
    h = hashlib.sha256(f"v{_VERSION}".encode())
    h.update(_tokenizer_digest(tokenizer))
    if chat:
        h.update(repr(("chat", getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token)).encode())
    h.update(docs.prompts.astype("<i8").tobytes())
    h.update(np.ascontiguousarray(docs.digests).tobytes())
    return h.hexdigest()[:32]
