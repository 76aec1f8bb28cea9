"""Sources: a dataset (Hub or local file) -> rows in their own schema -> documents via a text template.

A source yields `Documents`: each row's index in the split it was read from (the id the manifest hashes)
and its text, rendered a chunk at a time when needed. Rows whose rendered text is blank are skipped
(wikitext's empty lines).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from loramix.config import DataConfig, SourceConfig
from loramix.errors import LoramixError

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_CHUNK = 2048  # rows rendered per slice: sampling a 2M-row split never materialises it as Python objects


@dataclass(frozen=True)
class Document:
    source: str
    row: int  # index of the row in the split it was read from
    text: str
    prompt: int = 0  # characters of `text` that are the prompt (SourceConfig.prompt); 0: none


def source_path(name: str, spec: SourceConfig, data: DataConfig) -> Path | None:
    """The local file a source reads, if any: its own `path`, else `<local_dir>/<name>.jsonl`.

    Raises:
        LoramixError: data.local_dir names a file (the missing-file error would point inside it).
    """
    if spec.path:
        return Path(spec.path).expanduser()
    if data.local_dir:
        folder = Path(data.local_dir).expanduser()
        if folder.is_file():
            raise LoramixError(f"data.local_dir={data.local_dir} is a file, not a folder; point it at a folder of <source>.jsonl files such as {name}.jsonl")
        return folder / f"{name}.jsonl"
    return None


@dataclass(frozen=True, eq=False)
class Documents:
    """One source's documents by reference: rows of its table in sampled order, rendered a chunk at a time
    when their texts are needed, so a source's texts are never all in memory at once (125k cnn_dailymail
    articles held as Python strings took ~1 GB)."""

    source: str
    rows: np.ndarray  # int64, each document's row in the split it was read from
    prompts: np.ndarray  # int64, characters of each document's text that are its prompt
    digests: np.ndarray  # uint8 (n, 32), SHA-256 of each text's UTF-8: what the token cache is keyed on, without rendering again
    render: Callable[[list[int]], list[str]] = field(repr=False)  # the texts of these rows, in order

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> Document:
        return next(self.take(np.array([k])).chunks())[0]

    def __iter__(self) -> Iterator[Document]:
        return itertools.chain.from_iterable(self.chunks())

    def take(self, index) -> Documents:
        """The documents at `index` (positions, a slice or a boolean mask), in that order."""
        return replace(self, rows=self.rows[index], prompts=self.prompts[index], digests=self.digests[index])

    def chunks(self) -> Iterator[list[Document]]:
        """The documents in order, _CHUNK at a time."""
        for start in range(0, len(self.rows), _CHUNK):
            rows = self.rows[start : start + _CHUNK].tolist()
            prompts = self.prompts[start : start + _CHUNK].tolist()
            yield [Document(self.source, row, text, prompt) for row, text, prompt in zip(rows, self.render(rows), prompts)]

    @staticmethod
    def of(docs: list[Document]) -> Documents:
        """Documents held in memory, all of one source."""
        assert len({d.source for d in docs}) <= 1, "Documents hold one source"
        texts = {d.row: d.text for d in docs}
        return Documents(docs[0].source if docs else "", np.array([d.row for d in docs], dtype=np.int64),
                         np.array([d.prompt for d in docs], dtype=np.int64), _as_array([_sha256(d.text) for d in docs]),
                         lambda rows: [texts[r] for r in rows])


@dataclass(frozen=True)
class SourceRead:
    documents: Documents
    revision: str | None  # the Hub dataset's commit that was read; None for a local file
    text_sha256: str  # `JsonListDigest` of every document's text, in order (the manifest's)


def load_documents(name: str, spec: SourceConfig, data: DataConfig, cap: int | None) -> list[Document]:
    """Read a source, sample up to `cap` non-blank documents (seeded), in sampled order."""
    return list(read_source(name, spec, data, cap).documents)


def read_source(name: str, spec: SourceConfig, data: DataConfig, cap: int | None) -> SourceRead:
    """The source's documents (by reference), which revision of a Hub dataset was read, and the hash of its texts.

    Rows are rendered once here, a chunk at a time, to find the usable ones (not blank, up to `cap`) and hash
    their texts; the texts are rendered again whenever they are needed.

    Raises:
        LoramixError: missing/unreadable file, unreachable Hub dataset, template naming an absent
            field, or no usable rows.
    """
    path = source_path(name, spec, data)
    table, revision = (_load_local(name, path), None) if path else _load_hub(name, spec)
    for template in filter(None, (spec.template, spec.prompt)):
        _check_template(name, template, table.column_names)
    order = np.random.default_rng([data.seed, _stable_id(name)]).permutation(len(table))
    rows, prompts, hashes, digest = [], [], [], JsonListDigest()
    for row_id, text, prompt in _render(name, spec, table, order, cap):
        rows.append(row_id)
        prompts.append(prompt)
        hashes.append(_sha256(text))
        digest.add(text)
    if not rows:
        where = path or spec.hub_id
        raise LoramixError(f"source '{name}' has no usable rows in {where} (every rendered text is blank); check the file or data.sources.{name}.template")

    def render(ids: list[int]) -> list[str]:
        return [_format(name, "template", spec.template, row, row_id) for row_id, row in zip(ids, table.select(ids).to_list())]
    documents = Documents(name, np.array(rows, dtype=np.int64), np.array(prompts, dtype=np.int64), _as_array(hashes), render)
    return SourceRead(documents, revision, digest.hexdigest())


def _sha256(text: str) -> bytes:
    """A text's digest in `Documents.digests`."""
    return hashlib.sha256(text.encode()).digest()


def _as_array(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32)


class JsonListDigest:
    """SHA-256 of json.dumps(items, ensure_ascii=False), fed item by item (the whole dump of a large source's
    texts, and its UTF-8 copy, peaked at 1.9 GB on 106k cnn_dailymail articles)."""

    def __init__(self):
        self._h, self._first = hashlib.sha256(b"["), True

    def add(self, item) -> None:
        if not self._first:
            self._h.update(b", ")
        self._first = False
        self._h.update(json.dumps(item, ensure_ascii=False).encode())

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(b"]")
        return h.hexdigest()


def _stable_id(name: str) -> int:
    """A per-source seed component that does not depend on Python's salted str hash."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _render(name: str, spec: SourceConfig, table, order: np.ndarray, cap: int | None) -> Iterator[tuple[int, str, int]]:
    """(row, text, prompt characters) of the rows in `order` whose text is not blank, up to `cap` of them."""
    taken = 0
    for start in range(0, len(order), _CHUNK):
        idx = order[start : start + _CHUNK]
        for row_id, row in zip(idx.tolist(), table.select(idx).to_list()):
            text = _format(name, "template", spec.template, row, row_id)
            prompt = _format(name, "prompt", spec.prompt, row, row_id) if spec.prompt else ""
            if not text.startswith(prompt):
                raise LoramixError(f"source '{name}': on row {row_id} the prompt is not the start of the text; make "
                                   f"data.sources.{name}.prompt a prefix of data.sources.{name}.template")
            if text.strip():
                yield row_id, text, len(prompt)
                taken += 1
                if cap is not None and taken >= cap:
                    return


def _format(name: str, key: str, template: str, row: dict, row_id: int) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise LoramixError(f"source '{name}': {key} {template!r} fails on row {row_id} ({type(e).__name__}: {e}); fix data.sources.{name}.{key}") from e


def _check_template(name: str, template: str, columns: list[str]) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise LoramixError(f"source '{name}': template {template!r} is not a valid format string ({e}); fix data.sources.{name}.template") from e
    for f in fields:
        root = f.split("[", 1)[0].split(".", 1)[0]
        if not root or root.isdigit():
            raise LoramixError(f"source '{name}': template {template!r} has a positional field; name a column ({', '.join(columns)})")
        if root not in columns:
            raise LoramixError(f"source '{name}': template names field '{root}' which the data lacks (fields: {', '.join(columns)}); fix "
                               f"data.sources.{name}.template")


def _load_hub(name: str, spec: SourceConfig):
    """(table, revision): `load_dataset`'s own steps, keeping the builder, whose hash is the dataset
    repository's commit (resolved on the Hub, or the one cached when offline)."""
    import datasets

    if not spec.hub_id:
        raise LoramixError(f"source '{name}' has neither hub_id nor path; set data.sources.{name}.path=FILE or data.local_dir=DIR")
    try:
        builder = datasets.load_dataset_builder(spec.hub_id, spec.subset)
        builder.download_and_prepare()
        return builder.as_dataset(split=spec.split), builder.hash
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise LoramixError(f"source '{name}': {spec.hub_id} has no split '{spec.split}'; set data.sources.{name}.split") from e
        raise LoramixError(
            f"source '{name}': cannot load '{spec.hub_id}' from the Hugging Face Hub or its cache ({type(e).__name__}); "
            f"offline, point it at local files: data.local_dir=DIR with {name}.jsonl, or data.sources.{name}.path=FILE"
        ) from e


def _load_local(name: str, path: Path):
    import datasets

    fmt = _LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LoramixError(f"source '{name}': {path} has an unsupported extension; use one of {', '.join(_LOCAL_FORMATS)}")
    if not path.is_file():
        raise LoramixError(f"source '{name}': file {path} does not exist; fix data.local_dir or data.sources.{name}.path")
    text = fmt in ("json", "text", "csv")
    if text and not _is_utf8(path):  # datasets reads such a file and fails only when a row is taken
        _check_text_file(name, path, jsonl=path.suffix.lower() == ".jsonl")
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several types, naming no line: the file check does
        if text:
            _check_text_file(name, path, jsonl=path.suffix.lower() == ".jsonl")
        raise LoramixError(f"source '{name}': cannot read {path} as {fmt} ({_short(e)}); fix or convert the file") from e
    if text and not len(table):
        _check_text_file(name, path, jsonl=path.suffix.lower() == ".jsonl")
    return table


def _is_utf8(path: Path) -> bool:
    """Whether the file decodes as UTF-8, read in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as fh:
        try:
            while block := fh.read(1 << 24):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _check_text_file(name: str, path: Path, jsonl: bool) -> None:
    """Name the file and line of the first encoding or JSON Lines error, and call a blank file empty
    (datasets' own errors name neither, and say just "StopIteration" for an empty file). Run only when
    datasets could not read the file or found no rows: parsing every line twice cost 8 s at 1M documents."""
    empty = True
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LoramixError(f"source '{name}': {path} line {lineno} is not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from e
            if line.strip():
                empty = False
                if jsonl:
                    _check_json_line(name, path, lineno, line)
    if empty:
        raise LoramixError(f"source '{name}': {path} is empty; add rows or drop the source")


def _check_json_line(name: str, path: Path, lineno: int, line: str) -> None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise LoramixError(f"source '{name}': {path} line {lineno} is not valid JSON ({e.msg}, column {e.colno}); fix that line") from e
    if not isinstance(row, dict):
        raise LoramixError(f"source '{name}': {path} line {lineno} is not a JSON object; each line must be {{\"field\": ...}}")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
