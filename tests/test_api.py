"""The Python API (`import loramix`): a whole run driven from Python, the same eval.json as the CLI, errors
as exceptions with the CLI's messages, model cards that agree with eval.json and the report."""

import json
import re
import subprocess
import sys

import pytest
import yaml

import loramix
from loramix.cli import main

from conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"
TIMING = {"seconds", "samples_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, cache_dir):
    """A tiny run, config built in code, trained through `loramix.train` alone."""
    cfg = loramix.Config(
        name="api",
        model={"init": "random", "n_layer": 2, "n_embd": 32, "n_head": 2},
        lora={"r": 4, "alpha": 8},
        data={"local_dir": "@demo", "sources": ["tinystories", "ag_news", "squad"], "cap": 24, "seq_len": 64, "cache_dir": cache_dir},
        train={"epochs": 1, "micro_batch": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2, "log_every": 2, "eval_every": 4},
        eval={"batch_size": 8},
    )
    lines = []
    result = loramix.train(cfg, run_dir=tmp_path_factory.mktemp("api") / "run", log=lines.append, progress=False)
    return cfg, result, lines


def _card_rows(text: str) -> dict[str, list[str]]:
    """The metrics table of a model card (or report.md): name -> its cells."""
    return {m[1]: m[2].split(" | ") for m in re.finditer(r"^\| (\S+) \| ([\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+) \|$", text, re.MULTILINE)}


@pytest.mark.e2e
def test_import_is_light_and_lists_the_api():
    code = "import sys, loramix; print(sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules), 'train' in dir(loramix))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"


@pytest.mark.e2e
def test_config_built_in_code_equals_the_loaded_one():
    built = loramix.Config(name="x", lora={"r": 4, "targets": "c_attn"}, data={"sources": ["squad"], "cap": 5})
    assert built == loramix.load_config(None, ["name=x", "lora.r=4", "lora.targets=c_attn", "data.sources=[squad]", "data.cap=5"])
    assert built.data.sources["squad"].hub_id == "rajpurkar/squad"


@pytest.mark.e2e
def test_whole_run_through_the_python_api(api_run, tmp_path):
    _, result, lines = api_run
    run = result.run_dir
    assert lines[0].startswith("config:\n  name: api") and any(line.startswith("plan:") for line in lines)
    assert result.plan.total_steps == result.plan.steps_per_epoch and result.plan.trainable > 0
    saved = json.loads((run / "eval.json").read_text())
    assert result.eval.to_dict() == saved
    assert result.metrics == [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in result.metrics if r["event"] == "eval"][-1] == result.plan.total_steps == saved["step"]
    assert (result.adapter / "adapter_model.safetensors").is_file()

    again = loramix.evaluate(run, log=lambda *a: None, progress=False)
    assert again.overall.tokens == result.eval.overall.tokens
    assert again.overall.loss == pytest.approx(result.eval.overall.loss, rel=1e-5)
    assert set(again.per_source) == {"tinystories", "ag_news", "squad"}

    merged = loramix.merge(run, tmp_path / "merged")
    from_run = loramix.generate(run, "Once upon a time", max_new_tokens=6)
    from_merged = loramix.generate(merged, ["Once upon a time"], loramix.Sampling(max_new_tokens=6))
    assert from_run.texts == from_merged.texts and len(from_run.texts[0]) > 0 and from_run.tokens_per_s > 0
    md, page = loramix.report(run)
    assert _card_rows(md.read_text())["overall"][1] == f"{saved['overall']['loss']:.4f}" and page.is_file()


@pytest.mark.e2e
def test_errors_raise_with_the_cli_message(api_run, tmp_path, capsys):
    cfg, result, _ = api_run
    with pytest.raises(loramix.LoramixError) as e:
        loramix.evaluate(tmp_path)
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"loramix: error: {e.value}"
    with pytest.raises(loramix.LoramixError, match="already holds a run; pick another --run-dir or pass --overwrite"):
        loramix.train(cfg, run_dir=result.run_dir, log=lambda *a: None)
    with pytest.raises(loramix.LoramixError, match=r"train takes a Config, not str; load one with loramix.load_config"):
        loramix.train(str(DEMO))
    with pytest.raises(loramix.LoramixError, match=r"--top-p=2.0 must be in \(0, 1\]"):
        loramix.generate(result.run_dir, "x", top_p=2.0)
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.e2e
def test_cli_and_api_give_the_same_eval_json(api_run, tmp_path):
    """The config the API run was built from, saved as a preset for the CLI: the same eval.json (all but
    wall-clock timings), config.yaml and model card."""
    cfg, result, _ = api_run
    preset = tmp_path / "api.yaml"
    preset.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_dir = tmp_path / "cli"
    assert main(["train", "-c", str(preset), "--run-dir", str(run_dir), "--quiet"]) == 0
    cli, api = (json.loads((d / "eval.json").read_text()) for d in (run_dir, result.run_dir))
    assert {k: v for k, v in cli.items() if k not in TIMING} == {k: v for k, v in api.items() if k not in TIMING}
    assert (run_dir / "config.yaml").read_text() == (result.run_dir / "config.yaml").read_text()
    assert (run_dir / "adapter" / "README.md").read_text() == (result.adapter / "README.md").read_text()


@pytest.mark.e2e
def test_model_card_lists_the_metrics_of_eval_json_and_the_report(tiny_run, tmp_path):
    card = (tiny_run.run_dir / "adapter" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a random-init base is not on the Hub
    assert meta["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.1, "targets": ["c_attn", "c_proj"], "bias": "none"}
    assert "# license:" in card.split("---\n")[1]
    saved = json.loads((tiny_run.run_dir / "eval.json").read_text())
    rows = _card_rows(card)
    assert list(rows) == [*saved["per_source"], "overall"]
    for name, cells in rows.items():
        m = saved["overall"] if name == "overall" else saved["per_source"][name]
        assert cells == [f"{m['tokens']:,}", f"{m['loss']:.4f}", f"{m['ppl']:.2f}", f"{m['bpt']:.3f}", f"{m['bpb']:.3f}"]
    md, _ = loramix.report(tiny_run.run_dir, out=tmp_path)
    assert _card_rows(md.read_text()) == rows
    merged = loramix.merge(tiny_run.run_dir, tmp_path / "merged")
    merged_card = (merged / "README.md").read_text()
    assert yaml.safe_load(merged_card.split("---\n")[1])["library_name"] == "transformers"
    assert _card_rows(merged_card) == rows


@pytest.mark.e2e
def test_model_card_metadata_names_the_hub_datasets_and_base():
    from loramix.card import model_card

    cfg = loramix.load_config(ROOT / "configs" / "seed.yaml")
    meta = yaml.safe_load(model_card(cfg, None, None, ["c_attn", "c_proj"]).split("---\n")[1])
    assert meta["base_model"] == "gpt2" and meta["library_name"] == "peft"
    assert meta["datasets"] == sorted(["Salesforce/wikitext", "roneneldan/TinyStories", "fancyzhx/ag_news", "Yelp/yelp_review_full",
                                       "abisee/cnn_dailymail", "EdinburghNLP/xsum", "rajpurkar/squad", "stanfordnlp/imdb"])


@pytest.mark.e2e
def test_notebook_gets_progress_bars(monkeypatch):
    from tqdm import autonotebook, notebook

    from loramix.runtime import progress_bars

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress_bars()
    monkeypatch.setattr(autonotebook, "tqdm", notebook.tqdm)  # what tqdm.auto picks inside a Jupyter kernel
    assert progress_bars()
