"""One event log for the training loop: metrics.jsonl (the source of truth) plus optional trackers.

The loop calls `EventLog.write(row)` and nothing else; TensorBoard (on by default), Weights & Biases and
MLflow are fan-out sinks chosen by the config, each a no-op when off, so the loop has no per-tracker
branches. Rows re-logged after a resume appear again in the trackers (TensorBoard keeps the newest).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from loramix.config import TrackConfig
from loramix.errors import LoramixError


class EventLog:
    """Appends one JSON object per event to metrics.jsonl and forwards its numbers to the trackers."""

    def __init__(self, run_dir: Path, track: TrackConfig | None = None, enabled: bool = True, run_name: str = "run"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled  # False: a torchrun process other than rank 0
        self.sinks = _sinks(Path(run_dir), track, run_name) if enabled and track is not None else []

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        scalars = {f"{row['event']}/{k}": float(v) for k, v in row.items()
                   if k not in ("event", "step") and isinstance(v, (int, float)) and math.isfinite(v)}
        for sink in self.sinks:
            sink.log(scalars, row["step"])

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, nbytes: int) -> None:
        """Drop rows logged after a checkpoint, which the resumed run logs again."""
        if self.enabled:
            with open(self.path, "a+b") as fh:
                fh.truncate(nbytes)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sinks(run_dir: Path, track: TrackConfig, run_name: str) -> list:
    sinks = []
    if track.tensorboard:
        sinks.append(_TensorBoard(run_dir / "tensorboard"))
    if track.wandb:
        sinks.append(_Wandb(track.project, run_name, run_dir))
    if track.mlflow:
        sinks.append(_MLflow(track.project, run_name))
    return sinks


def _need(module: str, key: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoramixError(f"{key}=true needs the '{module}' package; pip install {module}, or set {key}=false") from None


class _TensorBoard:
    def __init__(self, log_dir: Path):
        _need("tensorboard", "track.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash loses nothing that metrics.jsonl has

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, project: str, name: str, run_dir: Path):
        self.wandb = _need("wandb", "track.wandb")
        self.run = self.wandb.init(project=project, name=name, dir=str(run_dir))

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, project: str, name: str):
        self.mlflow = _need("mlflow", "track.mlflow")
        self.mlflow.set_experiment(project)
        self.mlflow.start_run(run_name=name)

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
