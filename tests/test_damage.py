"""A run dir trusted months later: every damaged file ends in one line naming it and what to do, or is rebuilt
by itself with a line saying so; never a traceback, never a silently different config."""

import json
import shutil
from pathlib import Path

import pytest

from loramix.cli import main

from conftest import ROOT, TINY


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_at_line(path: Path) -> None:
    """Cut at the last line end before half: what is left still parses (as YAML, a partial config)."""
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) // 2) + 1])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what was written" * 64)


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the shared finished tiny run."""
    return Path(shutil.copytree(tiny_run.run_dir, tmp_path / "run"))


def _fails_in_one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("loramix: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.e2e
@pytest.mark.parametrize("damage", [_truncate, _garbage])
@pytest.mark.parametrize("command", ["eval", "merge"])
def test_a_damaged_adapter_names_the_checkpoint_that_rewrites_it(run, tmp_path, capsys, damage, command):
    weights = run / "adapter" / "adapter_model.safetensors"
    original = weights.read_bytes()
    damage(weights)
    argv = [command, str(run)] + (["--out", str(tmp_path / "merged")] if command == "merge" else [])
    err = _fails_in_one_line(capsys, argv)
    assert f"{weights} is damaged" in err and not (tmp_path / "merged").exists()
    fix = err[err.index("`") + 1 : err.rindex("`")]  # the command it suggests, run as written
    assert fix == f"loramix train -c {run / 'config.yaml'} --resume --run-dir {run}"
    if damage is _truncate and command == "eval":  # once is enough: the suggested command restores the same bytes
        assert main(fix.split()[1:] + ["--quiet"]) == 0
        assert weights.read_bytes() == original


@pytest.mark.e2e
@pytest.mark.parametrize("name, argv, message", [
    ("adapter/adapter_config.json", ["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "2"], "adapter_config.json is damaged (not valid JSON"),
    ("run.json", ["merge", "{run}", "--out", "{out}"], "run.json is damaged (not valid JSON"),
    ("eval.json", ["report", "{run}", "--out", "{out}"], "eval.json is damaged (not valid JSON"),
    ("manifest.json", ["report", "{run}", "--out", "{out}"], "manifest.json is damaged (not valid JSON"),
    ("config.yaml", ["eval", "{run}"], "config.yaml is not the config this run was trained with ("),
])
def test_a_damaged_run_file_ends_in_one_line_naming_it(run, tmp_path, capsys, name, argv, message):
    (_truncate_at_line if name == "config.yaml" else _truncate)(run / name)
    err = _fails_in_one_line(capsys, [a.format(run=run, out=tmp_path / "out") for a in argv])
    assert message in err and str(run / name) in err and not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_an_edited_training_key_in_config_yaml_is_refused(run, capsys):
    """A truncated config.yaml that still parses, or one edited by hand, would rebuild another run's data."""
    text = (run / "config.yaml").read_text()
    assert "  r: 8\n" in text
    (run / "config.yaml").write_text(text.replace("  r: 8\n", "  r: 4\n"))
    err = _fails_in_one_line(capsys, ["eval", str(run)])
    assert "its training keys differ from the config fingerprint in run.json" in err


@pytest.mark.e2e
@pytest.mark.parametrize("damage", [_truncate, _garbage])
def test_a_damaged_token_cache_is_rebuilt_saying_so(tiny_run, cache_dir, tmp_path, capsys, damage):
    """Every cached token file damaged: `eval` (garbage) and `train` (truncated) tokenize again, say so, and get
    the very same numbers."""
    cache = tmp_path / "cache"
    shutil.copytree(Path(cache_dir) / "tokens", cache / "tokens")
    stores = list((cache / "tokens").glob("*/ids.bin"))
    assert stores
    for f in stores:
        damage(f)
    if damage is _garbage:
        assert main(["eval", str(tiny_run.run_dir), f"data.cache_dir={cache}", "--out", str(tmp_path / "eval.json")]) == 0
        got = json.loads((tmp_path / "eval.json").read_text())["overall"]["loss"]
    else:
        from loramix import load_config, train

        cfg = load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache}"])
        got = train(cfg, tmp_path / "again", log=print, progress=False).eval.overall.loss
    out = capsys.readouterr().out
    assert "is damaged" in out and "tokenizing again" in out
    assert got == tiny_run.eval.overall.loss


@pytest.mark.e2e
def test_a_preparation_killed_midway_leaves_no_torn_store(tmp_path):
    """SIGKILLed while its first token store is written: no store under that name, only the temporary; the
    next run removes it and writes the same store a clean run writes."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import CRASHING

    cache = tmp_path / "cache"
    argv = [sys.executable, CRASHING, "train", "-c", str(ROOT / "configs" / "demo.yaml"), *TINY, f"data.cache_dir={cache}", "--dry-run"]
    killed = subprocess.run(argv, env={**os.environ, "LORAMIX_CRASH_AT": "tokenize-1"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    tokens = cache / "tokens"
    assert not [p for p in tokens.iterdir() if not p.name.startswith(".")] and [p for p in tokens.iterdir() if p.name.endswith(".tmp")]
    assert subprocess.run(argv, capture_output=True, text=True).returncode == 0
    assert not [p for p in tokens.iterdir() if p.name.startswith(".")]
    clean = tmp_path / "clean"
    assert subprocess.run([*argv[:-2], f"data.cache_dir={clean}", "--dry-run"], capture_output=True, text=True).returncode == 0
    assert sorted(p.name for p in tokens.iterdir()) == sorted(p.name for p in (clean / "tokens").iterdir())
    for store in tokens.iterdir():  # byte for byte what a run never killed writes
        for f in store.iterdir():
            assert f.read_bytes() == (clean / "tokens" / store.name / f.name).read_bytes(), f


@pytest.mark.e2e
def test_a_run_json_that_parses_but_holds_no_status_is_named(run, tmp_path, capsys):
    (run / "run.json").write_text(json.dumps({"status": "done?", "world_size": "two"}))
    err = _fails_in_one_line(capsys, ["merge", str(run), "--out", str(tmp_path / "out")])
    assert f"{run / 'run.json'} is damaged (2 field(s) wrong, first: status)" in err
