"""Never lose a run: exact resume after SIGKILL, damaged checkpoints, signals, non-finite steps, full disks."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loramix import checkpoint as ckpt
from loramix.cli import main
from loramix.config import load_config
from loramix.errors import LoramixError
from loramix.records import Fingerprints
from loramix.training import train

from conftest import CRASHING, ROOT, metric_rows


def _args(cache_dir):
    """A tiny run with LoRA dropout 0.1 and packing on: 12 steps, a checkpoint every 2, eval every 4."""
    return ["-c", str(ROOT / "configs" / "demo.yaml"), "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "data.cap=40", "data.seq_len=64", f"data.cache_dir={cache_dir}", "train.epochs=1", "train.micro_batch=2",
            "train.grad_accum=2", "train.max_steps=12", "train.log_every=1", "train.eval_every=4",
            "checkpoint.every=2", "checkpoint.keep=2", "lora.dropout=0.1", "data.packing=true"]


def _run(args, run_dir, crash_at=None, check=True):
    env = {**os.environ, "LORAMIX_CRASH_AT": crash_at or ""}
    proc = subprocess.run([sys.executable, CRASHING, "train", *args, "--run-dir", str(run_dir), "--resume", "--quiet"],
                          env=env, capture_output=True, text=True)
    if check and crash_at is None:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    _run(_args(cache_dir), run_dir)
    return run_dir


@pytest.mark.e2e
def test_killed_and_resumed_run_is_bit_identical(reference, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(cache_dir)
    proc = _run(args, run_dir, crash_at="step-3")  # between checkpoints: steps 3 is redone
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_names(run_dir) == ["step-0000002"]
    proc = _run(args, run_dir, crash_at="checkpoint-6-partial")  # killed while writing a checkpoint
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_names(run_dir) == ["step-0000002", "step-0000004"]
    assert list((run_dir / "checkpoints").glob(".step-0000006.*.tmp"))  # the torn write, never renamed
    proc = _run(args, run_dir, crash_at="step-9")
    assert proc.returncode == -signal.SIGKILL
    assert not list((run_dir / "checkpoints").glob(".*.tmp*"))
    _run(args, run_dir)
    ref = (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == ref
    assert metric_rows(run_dir) == metric_rows(reference)
    assert [r["step"] for r in metric_rows(run_dir) if r["event"] == "train"] == list(range(1, 13))
    assert json.loads((run_dir / "eval.json").read_text())["overall"] == json.loads((reference / "eval.json").read_text())["overall"]
    assert ckpt.latest_names(run_dir)[-2:] == ["step-0000010", "step-0000012"]


@pytest.mark.e2e
def test_killed_adaptive_run_resumes_bit_identically(cache_dir, tmp_path):
    """data.mix.strategy=adaptive, reweighting every 3 steps: killed inside an interval (its steps drawn
    again from the checkpointed weights and its loss sums restored) and at an interval's last step, the
    resumed run ends with the same bytes, the same rows and the same weights as one that never stopped."""
    from loramix.artifacts import load_run
    from loramix.reporting import mixture_weights

    args = _args(cache_dir) + ["data.mix.strategy=adaptive", "data.mix.every=3", "data.mix.step=2"]
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    _run(args, ref)
    for crash_at in ("step-5", "step-9"):  # checkpoints at 4 and 8: inside the intervals 3-6 and 6-9
        assert _run(args, run_dir, crash_at=crash_at).returncode == -signal.SIGKILL
    _run(args, run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == (ref / "adapter" / "adapter_model.safetensors").read_bytes()
    assert metric_rows(run_dir) == metric_rows(ref)
    moves = [r for r in metric_rows(ref) if r["event"] == "mix"]
    assert [r["step"] for r in moves] == [0, 3, 6, 9, 12]
    first, last = moves[0]["weights"], moves[-1]["weights"]
    assert max(abs(last[n] - first[n]) for n in first) > 0.02 and min(last.values()) >= 0.5 / len(last) - 1e-12  # moved, above the floor
    assert mixture_weights(load_run(ref))["squad"] == [(r["step"], r["weights"]["squad"]) for r in moves]


@pytest.mark.e2e
def test_sigterm_checkpoints_and_resumes_exactly(reference, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(cache_dir)
    cmd = [sys.executable, CRASHING, "train", *args, "--run-dir", str(run_dir), "--resume", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("loramix: error: stopped by SIGTERM after step ") and "--resume --run-dir" in line
    step = int(line.split("after step ")[1].split(";")[0])
    assert f"step-{step:07d}" in ckpt.latest_names(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    _run(args, run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    assert metric_rows(run_dir) == metric_rows(reference)


@pytest.mark.e2e
def test_damaged_checkpoint_is_skipped_for_the_previous(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    names = ckpt.latest_names(run_dir)
    newest = run_dir / "checkpoints" / names[-1]
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / "optimizer.pt").write_bytes(bytes(data))
    warnings = []
    assert ckpt.find_resumable(run_dir, warnings.append) == run_dir / "checkpoints" / names[-2]
    assert warnings == [f"warning: checkpoint {names[-1]} is damaged (optimizer.pt checksum mismatch); skipping it for the previous one"]


@pytest.mark.e2e
def test_resume_with_another_config_names_the_difference(reference, cache_dir, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "eval.json").unlink()
    assert main(["train", *_args(cache_dir), "lora.r=4", "--run-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lora.r: 8 -> 4" in err


def _tiny_cfg(cache_dir, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", _args(cache_dir)[2:] + ["train.log_every=1", *extra])


@pytest.mark.e2e
def test_checkpoint_of_another_lora_shape_is_refused(reference, cache_dir):
    from loramix.model import attach_lora, load_base_model

    cfg = _tiny_cfg(cache_dir, "lora.r=4")
    model = attach_lora(load_base_model(cfg.model, 64), cfg.lora, 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    path = ckpt.find_resumable(reference, lambda *a: None)
    with pytest.raises(LoramixError, match=r"lora_A.default.weight is \(8, 32\) there, \(4, 32\) here"):
        ckpt.load_checkpoint(path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), _fingerprints(path))


def _fingerprints(checkpoint: Path) -> Fingerprints:
    """The fingerprints a checkpoint was written with (so loading it gets past that check)."""
    raw = json.loads((checkpoint / "state.json").read_text())
    return Fingerprints(raw["base_fingerprint"], raw["config_fingerprint"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.e2e
def test_pickled_code_in_a_checkpoint_is_never_run(reference, cache_dir, tmp_path):
    import shutil

    from loramix.model import attach_lora, load_base_model

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    path = ckpt.find_resumable(run_dir, lambda *a: None)
    torch.save({"state": {}, "param_groups": [], "x": _Evil()}, path / "optimizer.pt", pickle_module=pickle)
    sums = json.loads((path / "checksums.json").read_text())
    sums["optimizer.pt"] = ckpt._sha256(path / "optimizer.pt")  # a forger can fix the checksum too
    (path / "checksums.json").write_text(json.dumps(sums))
    cfg = _tiny_cfg(cache_dir)
    model = attach_lora(load_base_model(cfg.model, 64), cfg.lora, 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(LoramixError, match="holds more than tensors and numbers"):
        ckpt.load_checkpoint(path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), _fingerprints(path))


def _nan_on_steps(monkeypatch, bad):
    """Training forward passes of the (1-based) optimizer steps in `bad` return NaN losses."""
    import loramix.training as tr

    real_nll, real_step, done = tr.token_nll, tr._optimizer_step, {"n": 0}

    def flaky(model, batch):
        out = real_nll(model, batch)
        return out * float("nan") if model.training and bad(done["n"] + 1) else out

    def counting(*args):
        applied = real_step(*args)
        done["n"] += 1
        return applied

    monkeypatch.setattr(tr, "token_nll", flaky)
    monkeypatch.setattr(tr, "_optimizer_step", counting)


@pytest.mark.e2e
def test_nonfinite_steps_are_skipped_and_counted(monkeypatch, cache_dir, tmp_path):
    _nan_on_steps(monkeypatch, lambda step: step in (3, 4))
    result = train(_tiny_cfg(cache_dir), tmp_path / "run", log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert result.eval.overall.loss < 11


@pytest.mark.e2e
def test_persistent_nonfinite_stops_and_keeps_the_last_good_checkpoint(monkeypatch, cache_dir, tmp_path):
    _nan_on_steps(monkeypatch, lambda step: step >= 5)
    with pytest.raises(LoramixError, match=r"not finite for 3 steps in a row \(up to step 7\); stopped, the last good checkpoint is step-0000006"):
        train(_tiny_cfg(cache_dir, "train.nonfinite_patience=3"), tmp_path / "run", log=lambda *a: None)
    path = ckpt.find_resumable(tmp_path / "run", lambda *a: None)
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(path / "trainable.safetensors").values())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


@pytest.mark.e2e
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(monkeypatch, cache_dir, tmp_path):
    real, calls = ckpt.save_file, {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's first file (two safetensors per checkpoint)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(LoramixError) as e:
        train(_tiny_cfg(cache_dir), tmp_path / "run", log=lambda *a: None)
    assert "cannot write checkpoint" in str(e.value) and "No space left on device" in str(e.value)
    assert "the previous checkpoint step-0000002 is intact" in str(e.value)
    assert ckpt.latest_names(tmp_path / "run") == ["step-0000002"]
    assert ckpt.verify(tmp_path / "run" / "checkpoints" / "step-0000002") is None
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp*"))


@pytest.mark.e2e
def test_keeps_the_newest_and_the_best(reference):
    names = ckpt.latest_names(reference)
    best = ckpt.best_checkpoint(reference)
    assert names[-2:] == ["step-0000010", "step-0000012"]
    assert best[0] in names and set(names) <= {best[0], "step-0000010", "step-0000012"}
    evals = [r for r in metric_rows(reference) if r["event"] == "eval"]
    assert best[1] == min(r["val_loss"] for r in evals)
    assert json.loads((reference / "run.json").read_text())["best_checkpoint"]["name"] == best[0]
