"""A run dir's records as types, written and read (validated) here: run.json (`RunStatus`), manifest.json
(`Manifest`), the fingerprints a resume and a checkpoint compare (`Fingerprints`), and the rows of
metrics.jsonl (`TrainRow`, `EvalRow`, `MixRow`). A file that does not parse, or parses into something
else, ends in one line naming it and what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from loramix.errors import LoramixError
from loramix.files import read_json, write_json


def _read(path: Path, kind: type, fix: str):
    try:
        return TypeAdapter(kind).validate_python(read_json(path, fix))
    except ValidationError as e:
        raise LoramixError(f"{path} is damaged ({e.error_count()} field(s) wrong, first: {'.'.join(map(str, e.errors()[0]['loc']))}); {fix}") from None


def _plain(record) -> dict:
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


# ---------------------------------------------------------------- run.json


@dataclass(frozen=True)
class Fingerprints:
    """What a run was made from: the base weights (`model.base_fingerprint`) and the config as asked
    (`Config.fingerprint(world_size)`). run.json and every checkpoint hold them; a resume compares them."""

    base: str
    config: str

    def to_dict(self) -> dict[str, str]:
        return {"base_fingerprint": self.base, "config_fingerprint": self.config}


@pydantic_dataclass
class RunStatus:
    """run.json: where a run stands and what it was made from. Written by `train` at each change of status;
    read (and validated) by every command that opens the run."""

    status: Literal["running", "finished", "interrupted", "failed"] | None = None  # None: no run.json yet
    base_fingerprint: str | None = None  # Fingerprints.base
    config_fingerprint: str | None = None  # Fingerprints.config
    device: str | None = None
    precision: str | None = None
    world_size: int = 1
    plan: dict = dataclasses.field(default_factory=dict)  # training.Plan's fields
    probe: dict = dataclasses.field(default_factory=dict)  # probe.Verdict.record()
    environment: dict = dataclasses.field(default_factory=dict)  # versions and hardware
    error: str | None = None  # a failed run's exception
    best_checkpoint: dict | None = None  # {name, val_loss} of a finished run


def read_status(run_dir: Path) -> RunStatus:
    """run.json (all defaults before the run wrote one).

    Raises:
        LoramixError: it does not parse or does not hold a run's status.
    """
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return RunStatus()
    return _read(path, RunStatus, "restore it from a copy, or delete it (eval, merge and serve then skip checking the base against the one the "
                                  "run trained on)")


def write_status(run_dir: Path, status: RunStatus) -> None:
    write_json(Path(run_dir) / "run.json", _plain(status))


# ---------------------------------------------------------------- manifest.json


@pydantic_dataclass(frozen=True)
class SourceEntry:
    """One source as read, capped and split, with hashes that prove which rows and texts."""

    origin: str  # the local file, or hub_id:subset:split
    revision: str | None  # the Hub dataset's commit; None for a local file
    template: str
    cap: int | None
    selected: int
    train: int
    val: int
    weight: float
    train_weighted: int  # training documents once the weight repeated them
    train_ids_sha256: str
    val_ids_sha256: str
    text_sha256: str


@pydantic_dataclass(frozen=True)
class SourceMix:
    """What a source got of the epoch under data.mix."""

    docs: int
    tokens: int
    share_docs: float
    share_tokens: float
    epochs: float  # passes over the source's own segments, in the mix's unit


@pydantic_dataclass(frozen=True)
class MixEntry:
    strategy: str
    unit: str
    sources: dict[str, SourceMix]


@pydantic_dataclass(frozen=True)
class Manifest:
    """manifest.json: the split's seed and share, each source's entry, and what the mix gave each."""

    seed: int
    val_share: float
    sources: dict[str, SourceEntry]
    mix: MixEntry | None = None


def read_manifest(run_dir: Path) -> Manifest | None:
    """manifest.json, or None where the run wrote none.

    Raises:
        LoramixError: it does not parse or does not hold a manifest.
    """
    path = Path(run_dir) / "manifest.json"
    return _read(path, Manifest, "restore it from a copy, or rerun the command that wrote it") if path.is_file() else None


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    write_json(Path(run_dir) / "manifest.json", dataclasses.asdict(manifest))  # nulls kept: a local file's revision is one


# ---------------------------------------------------------------- metrics.jsonl rows


@dataclass(frozen=True)
class TrainRow:
    """Training since the last row: the loss over its target tokens, overall and per source."""

    event: ClassVar[str] = "train"
    step: int
    epoch: float
    lr: float
    train_loss: float
    docs: int
    tokens: int
    skipped_steps: int
    elapsed_s: float
    tokens_per_s: float
    per_source: dict[str, dict[str, float]]  # {name: {train_loss, tokens}}


@dataclass(frozen=True)
class EvalRow:
    """A validation pass."""

    event: ClassVar[str] = "eval"
    step: int
    epoch: float
    val_loss: float
    val_ppl: float
    val_bpt: float
    val_bpb: float
    tokens: int
    elapsed_s: float
    samples_per_s: float
    eval_tokens_per_s: float
    per_source: dict[str, dict[str, float]]  # {name: {val_loss, val_ppl, val_bpb}}


@dataclass(frozen=True)
class MixRow:
    """An adaptive mixture's weights and the running training losses they came from."""

    event: ClassVar[str] = "mix"
    step: int
    weights: dict[str, float]
    loss: dict[str, float]


MetricsRow = TrainRow | EvalRow | MixRow


def row_dict(row: MetricsRow) -> dict:
    """The row as metrics.jsonl holds it: its event first, then its fields."""
    return {"event": row.event, **dataclasses.asdict(row)}
