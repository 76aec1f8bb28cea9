"""torchrun on CPU (gloo): 2 processes match 1 process with the same global batch; eval and resume across counts."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CRASHING, ROOT, metric_rows


def _args(cache_dir, grad_accum):
    """Dropout off everywhere: two processes draw other dropout masks than one, the rest must agree."""
    return ["train", "-c", str(ROOT / "configs" / "demo.yaml"), "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "model.dropout=0", "lora.dropout=0", "data.cap=40", "data.seq_len=64", f"data.cache_dir={cache_dir}",
            "train.epochs=1", "train.micro_batch=2", f"train.grad_accum={grad_accum}", "train.max_steps=6",
            "train.log_every=1", "train.eval_every=3", "checkpoint.every=2", "checkpoint.keep=100", "--quiet"]


def _launch(nproc, args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", CRASHING, *args]
    if nproc == 1:
        cmd = [sys.executable, CRASHING, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_rows_close(a, b):
    assert [(r["event"], r["step"]) for r in a] == [(r["event"], r["step"]) for r in b]
    for x, y in zip(a, b):
        for key in ("train_loss", "val_loss", "lr", "tokens", "docs"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (key, x, y)


def _assert_adapters_close(a, b):
    ta, tb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5)
    assert any(t.abs().sum() > 0 for k, t in ta.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("dist")
    _launch(1, _args(cache_dir, 4) + ["--run-dir", str(root / "one")])
    _launch(2, _args(cache_dir, 2) + ["--run-dir", str(root / "two")])
    return root / "one", root / "two"


@pytest.mark.parity
def test_two_processes_match_one_with_the_same_global_batch(runs):
    one, two = runs
    _assert_rows_close(metric_rows(two), metric_rows(one))
    _assert_adapters_close(two, one)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert json.loads((two / "eval.json").read_text())["overall"]["loss"] == pytest.approx(
        json.loads((one / "eval.json").read_text())["overall"]["loss"], rel=1e-5)


@pytest.mark.parity
def test_adaptive_mixture_on_two_processes_matches_one(tmp_path, cache_dir):
    """The weights come from every process's per-source sums: 2 processes reweight as 1 does, and so draw
    the same steps and train to the same losses."""
    adaptive = ["data.mix.strategy=adaptive", "data.mix.every=2", "data.mix.step=2"]
    _launch(1, _args(cache_dir, 4) + adaptive + ["--run-dir", str(tmp_path / "one")])
    _launch(2, _args(cache_dir, 2) + adaptive + ["--run-dir", str(tmp_path / "two")])
    one, two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    _assert_rows_close(two, one)
    moves = [(r, s) for r, s in zip(one, two) if r["event"] == "mix"]
    assert [r["step"] for r, _ in moves] == [0, 2, 4, 6]
    for r, s in moves:
        assert s["weights"] == pytest.approx(r["weights"], rel=1e-6)
    assert moves[-1][0]["weights"] != moves[0][0]["weights"]
    _assert_adapters_close(tmp_path / "one", tmp_path / "two")


@pytest.mark.parity
def test_eval_on_two_processes_equals_one(runs, tmp_path):
    one, _ = runs
    _launch(1, ["eval", str(one), "--out", str(tmp_path / "e1.json"), "--quiet"])
    _launch(2, ["eval", str(one), "--out", str(tmp_path / "e2.json"), "--quiet"])
    e1, e2 = json.loads((tmp_path / "e1.json").read_text()), json.loads((tmp_path / "e2.json").read_text())
    assert e2["samples"] == e1["samples"] and e2["rows"] == e1["rows"]
    for name in ["overall", *e1["per_source"]]:
        a = e1["overall"] if name == "overall" else e1["per_source"][name]
        b = e2["overall"] if name == "overall" else e2["per_source"][name]
        assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


@pytest.mark.parity
def test_two_process_checkpoint_resumes_on_one(runs, tmp_path, cache_dir):
    one, two = runs
    run = tmp_path / "moved"
    shutil.copytree(two, run)
    (run / "eval.json").unlink()
    for name in ("step-0000004", "step-0000006"):
        shutil.rmtree(run / "checkpoints" / name)
    proc = _launch(1, _args(cache_dir, 4)[:-1] + ["--run-dir", str(run), "--resume"])
    assert "written by another number of processes" in proc.stdout
    _assert_rows_close(metric_rows(run), metric_rows(two))
    _assert_adapters_close(run, two)


@pytest.mark.parity
def test_another_global_batch_is_refused_on_resume(runs, tmp_path, cache_dir):
    _, two = runs
    run = tmp_path / "moved"
    shutil.copytree(two, run)
    (run / "eval.json").unlink()
    proc = _launch(1, _args(cache_dir, 2) + ["--run-dir", str(run), "--resume"], check=False)
    assert proc.returncode == 2
    assert "train.global_batch: 8 -> 4" in proc.stderr


@pytest.mark.parity
def test_two_process_resume_is_bit_exact_with_dropout(cache_dir, tmp_path):
    """Killed (SIGKILL, every process) between checkpoints and resumed on 2 processes: same bytes, same rows."""
    import os

    args = [a for a in _args(cache_dir, 2) if not a.endswith("dropout=0")]  # GPT-2 and LoRA dropout on
    ref, run = tmp_path / "ref", tmp_path / "run"
    _launch(2, args + ["--run-dir", str(ref)])
    os.environ["LORAMIX_CRASH_AT"] = "step-3"
    try:
        assert _launch(2, args + ["--run-dir", str(run)], check=False).returncode != 0
    finally:
        del os.environ["LORAMIX_CRASH_AT"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000002"]
    _launch(2, args + ["--run-dir", str(run), "--resume"])
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (ref / "adapter" / "adapter_model.safetensors").read_bytes()
    assert metric_rows(run) == metric_rows(ref)
