"""One event log for the training loop: metrics.jsonl (the source of truth) plus optional trackers.

The loop calls `EventLog.write(row)` and nothing else; TensorBoard (on by default), Weights & Biases and
MLflow are fan-out sinks chosen by the config, each a no-op when off, so the loop has no per-tracker
branches. Every tracker gets each row right after metrics.jsonl does, the resolved config once (as
parameters), and at the end the final metrics overall and per source (`final/<source>/<metric>`; MLflow
also the adapter as an artifact).

A run dir has one tracker run per tracker: the W&B and MLflow run ids are kept in trackers.json, and a
resumed run continues those runs. Each tracker is asked what it has of its run (the last step of each
kind of row: train, eval, final) and gets only rows beyond that: the rows a resumed run logs again after
its checkpoint reach it once, and rows it lost when the process was killed (W&B buffers its files) are
sent again from metrics.jsonl.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from loramix.config import TrackConfig, flatten
from loramix.errors import LoramixError
from loramix.evaluation import EvalResult
from loramix.files import read_json, write_json
from loramix.records import MetricsRow, row_dict

TRACKERS_FILE = "trackers.json"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # config key under track. -> module
_MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


class EventLog:
    """Appends one JSON object per event to metrics.jsonl and forwards its numbers to the trackers."""

    def __init__(self, run_dir: Path, track: TrackConfig | None = None, enabled: bool = True, run_name: str = "run",
                 config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled  # False: a torchrun process other than rank 0
        self.sinks = _open_sinks(Path(run_dir), track, run_name, config or {}) if enabled and track is not None else []

    def write(self, row: MetricsRow) -> None:
        if not self.enabled:
            return
        line = row_dict(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        self._forward(line)

    def _forward(self, row: dict) -> None:
        scalars = _scalars({k: v for k, v in row.items() if k not in ("event", "step")}, f"{row['event']}/")
        for sink in self.sinks:
            if sink.lacks(row["event"], row["step"]):
                sink.log(scalars, row["step"])

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def rewind(self, nbytes: int) -> None:
        """Resuming: drop the rows logged after the checkpoint (the resumed run logs them again), and send
        each tracker the rows up to the checkpoint that it lacks."""
        if not self.enabled:
            return
        with open(self.path, "a+b") as fh:
            fh.truncate(nbytes)
        for row in read_metrics(self.path.parent):
            self._forward(row)

    def finish(self, result: EvalResult, adapter: Path) -> None:
        """Hand the trackers the final metrics (overall and per source) and the adapter, and close them."""
        final = {f"final/{name}/{k}": getattr(m, k) for name, m in result.named() for k in ("loss", "ppl", "bpt", "bpb")}
        final = {k: v for k, v in final.items() if math.isfinite(v)}
        for sink in self.sinks:
            if sink.lacks("final", result.step or 0):
                sink.finish(final, result.step or 0, Path(adapter))
        self.close()

    def close(self, status: str = "finished") -> None:
        """End the tracker runs ('finished', 'interrupted' or 'failed'); closing twice does nothing."""
        for sink in self.sinks:
            sink.close(status)
        self.sinks = []


def _scalars(row: dict, prefix: str) -> dict[str, float]:
    """A metrics row's finite numbers as tracker keys, nested ones joined by '/' (eval/per_source/squad/val_loss)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line torn by a kill is not a row."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def check_trackers(track: TrackConfig) -> None:
    """Before anything is written: every tracker the config turns on is installed (and MLflow's store opens).

    Raises:
        LoramixError: naming the package to install, or the key that turns the tracker off.
    """
    for key, module in _PACKAGES.items():
        if getattr(track, key) and importlib.util.find_spec(module) is None:
            raise LoramixError(_install_hint(key))
    if track.mlflow:
        _mlflow_client()


def _install_hint(key: str) -> str:
    return f"track.{key}=true needs the '{_PACKAGES[key]}' package; pip install {_PACKAGES[key]}, or set track.{key}=false"


def _need(key: str):
    try:
        return importlib.import_module(_PACKAGES[key])
    except ImportError:
        raise LoramixError(_install_hint(key)) from None


def _open_sinks(run_dir: Path, track: TrackConfig, run_name: str, config: dict) -> list:
    """The trackers the config turns on; W&B and MLflow continue the runs named in trackers.json, if any."""
    ids_path = run_dir / TRACKERS_FILE
    ids = read_json(ids_path) if ids_path.is_file() else {}
    sinks = []
    if track.tensorboard:
        sinks.append(_TensorBoard(run_dir / "tensorboard", config))
    if track.wandb:
        sinks.append(_Wandb(track.project, run_name, run_dir, ids.get("wandb"), config))
    if track.mlflow:
        sinks.append(_MLflow(track.project, run_name, ids.get("mlflow"), config))
    now = {**ids, **{s.key: s.run_id for s in sinks if s.run_id}}
    if now != ids:
        write_json(ids_path, now)
    return sinks


class _Sink:
    """What every tracker shares: the last step of each kind of row it has of its run, so nothing reaches it twice."""

    key: str
    run_id: str | None = None
    seen: dict[str, int]

    def lacks(self, kind: str, step: int) -> bool:
        return step > self.seen.get(kind, -1)


def _last_steps(pairs) -> dict[str, int]:
    """(key, step) pairs -> the last step of each kind, the key's head ('train/train_loss' -> 'train')."""
    seen: dict[str, int] = {}
    for key, step in pairs:
        kind = key.split("/")[0]
        seen[kind] = max(step, seen.get(kind, -1))
    return seen


class _TensorBoard(_Sink):
    key = "tensorboard"

    def __init__(self, log_dir: Path, config: dict):
        _need(self.key)
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from torch.utils.tensorboard import SummaryWriter

        files = sorted(log_dir.glob("events.out.tfevents.*"))
        self.seen = _last_steps((v.tag, e.step) for f in files for e in EventFileLoader(str(f)).Load() for v in e.summary.value)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if not files:  # a resumed run's event files have the config already
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash loses nothing that metrics.jsonl has

    def finish(self, final: dict, step: int, adapter: Path) -> None:
        self.log(final, step)

    def close(self, status: str) -> None:
        self.writer.close()


class _Wandb(_Sink):
    """A W&B run whose files go to <run dir>/wandb (WANDB_MODE=offline keeps them there for `wandb sync`)."""

    key = "wandb"

    def __init__(self, project: str, name: str, run_dir: Path, run_id: str | None, config: dict):
        wandb = _need(self.key)
        self.seen = _wandb_steps(run_dir / "wandb", run_id) if run_id else {}
        # A resumed run continues its W&B run by id (offline: in a new directory with the same id, which
        # `wandb sync` joins); a killed process may have left W&B without the config, so it is given again.
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                              config=config, allow_val_change=True, reinit="create_new")
        self.run_id = self.run.id

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, final: dict, step: int, adapter: Path) -> None:
        self.run.summary.update(final)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def _wandb_steps(folder: Path, run_id: str) -> dict[str, int]:
    """The last step of each kind in the history of W&B run `run_id`, read from the transaction logs that
    every process start of it wrote (<folder>/*-<id>/run-<id>.wandb): what W&B has of the run."""
    from google.protobuf.message import DecodeError
    from wandb.proto.wandb_internal_pb2 import Record

    pairs = []
    for path in sorted(folder.glob(f"*-{run_id}/run-{run_id}.wandb")):
        for blob in _log_records(path.read_bytes()):
            record = Record()
            try:
                record.ParseFromString(blob)
            except DecodeError:
                break
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            pairs += [(key, int(json.loads(items["_step"]))) for key in items if "/" in key and "_step" in items]
    return _last_steps(pairs)


def _log_records(data: bytes) -> Iterator[bytes]:
    """The records of a W&B transaction log: a 7-byte header (':W&B', magic 0xBEE1, version), then LevelDB's
    log format: 32 KiB blocks of chunks, each after a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last). W&B writes it through a buffer, so a killed process leaves it short: a torn tail ends it."""
    if data[:6] != b":W&B\xe1\xbe":
        return
    pos, parts = 7, b""
    while True:
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
        if pos + 7 > len(data):
            return
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind not in (1, 2, 3, 4) or pos + 7 + length > len(data):
            return
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield parts
            parts = b""


def _mlflow_client():
    """A client of the store MLFLOW_TRACKING_URI names (MLflow's default without it), opened now.

    Raises:
        LoramixError: a store that does not open (unreachable server, a file store MLflow refuses, ...).
    """
    mlflow = _need("mlflow")
    try:
        client = mlflow.MlflowClient()
        client.search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as e:
        first = str(e.message).strip().split(". ")[0].splitlines()[0]
        raise LoramixError(f"track.mlflow=true: cannot open the MLflow tracking store {mlflow.get_tracking_uri()} ({first}); "
                           "set MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db or http://host:5000), or set track.mlflow=false") from e
    return client


class _MLflow(_Sink):
    """An MLflow run in the experiment named track.project."""

    key = "mlflow"

    def __init__(self, project: str, name: str, run_id: str | None, config: dict):
        self.mlflow = _need(self.key)
        self.client = _mlflow_client()
        self.seen = self._resume(run_id) if run_id else {}
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [self.mlflow.entities.Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in flatten(config).items()]
            self.client.log_batch(run_id, params=params)
        self.run_id = run_id

    def _resume(self, run_id: str) -> dict[str, int]:
        try:
            keys = self.client.get_run(run_id).data.metrics
        except self.mlflow.exceptions.MlflowException as e:
            raise LoramixError(f"MLflow run {run_id} of this run dir is not in the tracking store {self.client.tracking_uri}; "
                               "set MLFLOW_TRACKING_URI to the store the run started in, or set track.mlflow=false") from e
        self.client.update_run(run_id, status="RUNNING")
        return _last_steps((key, m.step) for key in keys for m in self.client.get_metric_history(run_id, key))

    def log(self, scalars: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.mlflow.entities.Metric(k, v, now, step) for k, v in scalars.items()])

    def finish(self, final: dict, step: int, adapter: Path) -> None:
        self.log(final, step)
        self.client.log_artifacts(self.run_id, str(adapter), artifact_path="adapter")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS[status])
