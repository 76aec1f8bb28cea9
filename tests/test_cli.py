"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, no run dir left."""

import json
import subprocess
import sys

import pytest

from loramix.cli import main

from conftest import ROOT

DEMO = str(ROOT / "configs" / "demo.yaml")


def _fails(capsys, argv, message, run_dir):
    rc = main(argv + ["--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("loramix: error: ") and "\n" not in err and "Traceback" not in err
    assert message in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("override, message", [
    ("lora.rnak=8", "unknown key 'lora.rnak'"),
    ("lora.r=abc", "lora.r='abc' must be an integer"),
    ("data.cap=0", "data.cap=0 must be > 0"),
    ("train.micro_batch=-2", "train.micro_batch=-2 must be > 0"),
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("train.epochs=0", "train.epochs=0 must be > 0"),
    ("data.val_share=1", "data.val_share=1.0 must be in (0, 1)"),
    ("data.sources.xsum.template={body}", "template names field 'body' which the data lacks (fields: document, summary, id); fix data.sources.xsum.template"),
    ("model.name=/no/such/model", "model directory /no/such/model does not exist"),
    ("data.seq_len=2048", "data.seq_len=2048 is beyond the model's 1024 positions; set data.seq_len<=1024"),
    ("train.device=tpu", "train.device='tpu' is not a device (choose one of: auto, cpu, cuda, cuda:N, mps)"),
    ("train.compile=maybe", "train.compile='maybe' is not allowed (choose one of: auto, on, off)"),
    ("data.local_dir=/no/such/dir", "/no/such/dir/wikitext.jsonl does not exist; fix data.local_dir"),
])
@pytest.mark.e2e
def test_train_bad_input(capsys, tmp_path, tiny_overrides, override, message):
    _fails(capsys, ["train", "-c", DEMO, *tiny_overrides, override], message, tmp_path / "run")


@pytest.mark.e2e
def test_bad_local_files(capsys, tmp_path, tiny_overrides):
    data = tmp_path / "data"
    data.mkdir()
    (data / "imdb.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n\n{"text": "no closing quote}\n', encoding="utf-8")
    (data / "ag_news.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (data / "yelp_review_full.jsonl").write_text('{"text": " "}\n{"text": ""}\n', encoding="utf-8")
    base = ["train", "-c", DEMO, *tiny_overrides, f"data.local_dir={data}"]
    _fails(capsys, base + ["data.sources=[imdb]"], "imdb.jsonl line 4 is not valid JSON", tmp_path / "r1")
    _fails(capsys, base + ["data.sources=[ag_news]"], "ag_news.jsonl line 2 is not UTF-8", tmp_path / "r2")
    _fails(capsys, base + ["data.sources=[yelp_review_full]"], "source 'yelp_review_full' has no usable rows", tmp_path / "r3")


@pytest.mark.e2e
def test_missing_preset_and_existing_run(capsys, tmp_path, tiny_overrides):
    _fails(capsys, ["train", "-c", str(tmp_path / "nope.yaml")], "config file", tmp_path / "r")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "eval.json").write_text("{}")
    assert main(["train", "-c", DEMO, *tiny_overrides, "--run-dir", str(taken)]) == 2
    assert "already holds a run; pick another --run-dir or pass --overwrite" in capsys.readouterr().err
    assert json.loads((taken / "eval.json").read_text()) == {}


@pytest.mark.e2e
def test_eval_on_a_non_run_dir(capsys, tmp_path):
    assert main(["eval", str(tmp_path)]) == 2
    assert "is neither a loramix run dir (config.yaml) nor a PEFT adapter dir" in capsys.readouterr().err


@pytest.mark.e2e
def test_debug_shows_the_traceback(tmp_path):
    from loramix.errors import LoramixError

    with pytest.raises(LoramixError):
        main(["train", "-c", DEMO, "lora.rnak=8", "--debug", "--run-dir", str(tmp_path / "r")])


@pytest.mark.e2e
def test_console_script_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "-m", "loramix", "train", "-c", DEMO, "train.epochs=0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "loramix: error: bad config: train.epochs=0 must be > 0"


@pytest.mark.e2e
def test_overrides_may_follow_options(capsys, cache_dir):
    assert main(["config", "-c", DEMO, "lora.r=4", "--quiet", "train.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "epochs: 5" in out
    with pytest.raises(SystemExit):
        main(["config", "-c", DEMO, "--bogus"])
