"""Sources: a dataset (Hub or local file) -> rows in their own schema -> documents via a text template.

A source yields `Document`s: the text and the row's index in the split it was read from (the id the
manifest hashes). Rows whose rendered text is blank are skipped (wikitext's empty lines).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SourceRead:
    documents: list[Document]
    revision: str | None  # the Hub dataset's commit that was read; None for a local file


def load_documents(name: str, spec: SourceConfig, data: DataConfig, cap: int | None) -> list[Document]:
    """Read a source, sample up to `cap` non-blank documents (seeded), in sampled order."""
    return read_source(name, spec, data, cap).documents


def read_source(name: str, spec: SourceConfig, data: DataConfig, cap: int | None) -> SourceRead:
    """`load_documents`, and which revision of a Hub dataset was read.

    Raises:
        LoramixError: missing/unreadable file, unreachable Hub dataset, template naming an absent
            field, or no usable rows.
    """
    path = source_path(name, spec, data)
    table, revision = (_load_local(name, path), None) if path else _load_hub(name, spec)
    for template in filter(None, (spec.template, spec.prompt)):
        _check_template(name, template, table.column_names)
    order = np.random.default_rng([data.seed, _stable_id(name)]).permutation(len(table))
    docs = list(_render(name, spec, table, order, cap))
    if not docs:
        where = path or spec.hub_id
        raise LoramixError(f"source '{name}' has no usable rows in {where} (every rendered text is blank); check the file or data.sources.{name}.template")
    return SourceRead(docs, revision)


def _stable_id(name: str) -> int:
    """A per-source seed component that does not depend on Python's salted str hash."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _render(name: str, spec: SourceConfig, table, order: np.ndarray, cap: int | None) -> Iterator[Document]:
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
                yield Document(name, row_id, text, len(prompt))
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
