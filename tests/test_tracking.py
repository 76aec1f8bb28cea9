"""Trackers run for real: W&B offline and MLflow on a local file store get the rows of metrics.jsonl, the
config, the final metrics and (MLflow) the adapter; a killed and resumed run stays one tracker run whose
step series has no duplicates (TensorBoard too)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from loramix.cli import main
from loramix.config import TrackConfig
from loramix.errors import LoramixError
from loramix.records import EvalRow, TrainRow
from loramix.tracking import EventLog, _last_steps, _Sink, check_trackers

from conftest import CRASHING, ROOT

DEMO = str(ROOT / "configs" / "demo.yaml")


class _Tracker(_Sink):
    """A stand-in tracker that keeps every (key, step) it was sent, and knows from them what it has."""

    def __init__(self, sent: list):
        self.sent = sent
        self.seen = _last_steps(sent)

    def log(self, scalars: dict, step: int) -> None:
        self.sent += [(key, step) for key in scalars]

    def close(self, status: str) -> None:
        pass


def _row(event: str, step: int) -> TrainRow | EvalRow:
    """A row whose only number (a tracker gets finite numbers only) is its loss."""
    nan = float("nan")
    if event == "train":
        return TrainRow(step, nan, nan, 1.0 / step, 0, 0, 0, nan, nan, {})
    return EvalRow(step, nan, 1.0 / step, nan, nan, nan, 0, nan, nan, nan, {})


@pytest.mark.unit
def test_after_a_resume_each_tracker_gets_every_row_once(tmp_path):
    """Validation every 2 steps, a checkpoint after step 2, killed before the validation of step 6; one
    tracker kept all it was sent, the other (like W&B's buffered files) lost everything after step 3."""
    kept, lossy = [], []
    first = EventLog(tmp_path)
    first.sinks = [_Tracker(kept), _Tracker(lossy)]
    for step in range(1, 7):
        first.write(_row("train", step))
        if step in (2, 4):
            first.write(_row("eval", step))
        if step == 2:
            checkpoint_at = first.size()
    del lossy[lossy.index(("train/train_loss", 4)):]
    resumed = EventLog(tmp_path)
    resumed.sinks = [_Tracker(kept), _Tracker(lossy)]
    resumed.rewind(checkpoint_at)
    for step in range(3, 8):
        resumed.write(_row("train", step))
        if step in (4, 6):
            resumed.write(_row("eval", step))
    rows = [(r["event"], r["step"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert rows == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4), ("train", 5), ("train", 6),
                    ("eval", 6), ("train", 7)]
    expected = sorted((f"{event}/{event.replace('eval', 'val')}_loss", step) for event, step in rows)
    kept, lossy = [(k, s) for k, s in kept if k.endswith("loss")], [(k, s) for k, s in lossy if k.endswith("loss")]
    assert sorted(kept) == expected and sorted(lossy) == expected


@pytest.mark.unit
def test_a_missing_tracker_package_names_the_install(monkeypatch, tmp_path, capsys, tiny_overrides):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(LoramixError, match=r"^track.mlflow=true needs the 'mlflow' package; pip install mlflow, or set track.mlflow=false$"):
        check_trackers(TrackConfig(mlflow=True))
    check_trackers(TrackConfig(wandb=True))
    assert main(["train", "-c", DEMO, *tiny_overrides, "track.mlflow=true", "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "loramix: error: track.mlflow=true needs the 'mlflow' package; pip install mlflow, or set track.mlflow=false"
    assert not (tmp_path / "run").exists()


def _wandb_records(run_dir, run_id: str) -> list:
    """The records of every transaction log of W&B run `run_id` (one per process start), oldest first."""
    from wandb.proto.wandb_internal_pb2 import Record

    from loramix.tracking import _log_records

    records = []
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for blob in _log_records(path.read_bytes()):
            records.append(Record())
            records[-1].ParseFromString(blob)
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.mark.unit
def test_an_mlflow_store_that_does_not_open_stops_the_run_before_it_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(LoramixError, match=r"^track.mlflow=true: cannot open the MLflow tracking store file:.*mlruns \(The filesystem tracking "
                                           r"backend .* is in maintenance mode.*\); set MLFLOW_TRACKING_URI \(e.g. sqlite:///mlflow.db"):
        check_trackers(TrackConfig(mlflow=True))


@pytest.mark.e2e
def test_wandb_mlflow_and_tensorboard_stay_one_run_across_a_kill(tmp_path, cache_dir, monkeypatch):
    """Killed after step 5 (checkpoint at 4) and resumed: each tracker ends with one run holding every row of
    metrics.jsonl once. MLflow and TensorBoard had step 5 already and must not get it again; W&B's offline
    files lost what the killed process buffered, and the resumed run sends it again."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, store = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    # W&B offline without its system metrics, metadata and console capture, which cost seconds of CPU here.
    quiet_wandb = {"WANDB_SILENT": "true", "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_META": "true", "WANDB_DISABLE_GIT": "true",
                   "WANDB_CONSOLE": "off", "WANDB_X_SAVE_REQUIREMENTS": "false"}
    env = {**os.environ, **quiet_wandb, "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    cmd = [sys.executable, CRASHING, "train", "-c", DEMO, "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
           "data.cap=24", "data.seq_len=64", f"data.cache_dir={cache_dir}", "data.sources=[tinystories, squad]", "train.max_steps=6",
           "train.micro_batch=2", "train.grad_accum=1", "train.log_every=1", "train.eval_every=2", "checkpoint.every=2",
           "eval.base_compare=false", "data.mix.strategy=adaptive", "data.mix.every=2", "track.wandb=true", "track.mlflow=true", "track.project=loramix-test",
           "--run-dir", str(run_dir), "--resume", "--quiet"]
    killed = subprocess.run(cmd, env={**env, "LORAMIX_CRASH_AT": "step-5"}, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ids = json.loads((run_dir / "trackers.json").read_text())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["train_loss"]) for r in rows if r["event"] == "train"]
    evals = [(r["step"], r["val_loss"]) for r in rows if r["event"] == "eval"]
    assert [s for s, _ in train] == [1, 2, 3, 4, 5, 6] and [s for s, _ in evals] == [2, 4, 6]
    final = json.loads((run_dir / "eval.json").read_text())

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to open a file store
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("loramix-test").experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    weights = [(r["step"], r["weights"]["squad"]) for r in rows if r["event"] == "mix"]
    assert [s for s, _ in weights] == [0, 2, 4, 6] and len({w for _, w in weights}) == 4  # adaptive: the weights moved at each update
    per_source = {f"{e}/per_source/squad/{k}": [(r["step"], r["per_source"]["squad"][k]) for r in rows if r["event"] == e]
                  for e, k in (("train", "train_loss"), ("eval", "val_loss"), ("eval", "val_bpb"))}
    for key, expected in (("train/train_loss", train), ("eval/val_loss", evals), ("mix/weights/squad", weights), *per_source.items()):
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == expected, key
    assert run.data.params["lora.r"] == "8" and run.data.params["data.sources.squad.hub_id"] == "rajpurkar/squad"
    assert run.data.metrics["final/overall/loss"] == pytest.approx(final["overall"]["loss"])
    assert run.data.metrics["final/squad/bpb"] == pytest.approx(final["per_source"]["squad"]["bpb"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {"adapter/adapter_model.safetensors", "adapter/README.md"}

    assert {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")} == {ids["wandb"]}
    records = _wandb_records(run_dir, ids["wandb"])
    history = [_items(r.history.item) for r in records if r.HasField("history")]
    assert [(h["_step"], h["train/train_loss"]) for h in history if "train/train_loss" in h] == train
    assert [(h["_step"], h["eval/val_loss"]) for h in history if "eval/val_loss" in h] == evals
    assert [(h["_step"], h["mix/weights/squad"]) for h in history if "mix/weights/squad" in h] == weights
    summary = {k: v for r in records if r.HasField("summary") for k, v in _items(r.summary.update).items()}
    assert summary["final/overall/loss"] == pytest.approx(final["overall"]["loss"])
    config = {k: v for r in records if r.HasField("run") for k, v in _items(r.run.config.update).items()}
    assert config["lora"]["r"] == 8 and config["data"]["sources"]["squad"]["hub_id"] == "rajpurkar/squad"

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tensorboard = [(e.step, e.value) for e in acc.Scalars("train/train_loss")]
    assert [s for s, _ in tensorboard] == [s for s, _ in train]
    assert [v for _, v in tensorboard] == pytest.approx([v for _, v in train], rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("mix/weights/squad")] == [0, 2, 4, 6]
    assert [e.value for e in acc.Scalars("eval/per_source/squad/val_loss")] == pytest.approx([v for _, v in per_source["eval/per_source/squad/val_loss"]],
                                                                                           rel=1e-6)
