"""Reports, TensorBoard events and the forgetting check, from a tiny run."""

import json
import re

import pytest

from loramix.cli import main
from loramix.config import load_config
from loramix.reporting import smooth
from loramix.training import train

from conftest import ROOT, TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}", "eval.base_compare=true",
                                                            "data.sources=[tinystories, ag_news, squad, imdb]",
                                                            "eval.forgetting_sources=[wikitext, xsum]", "eval.forgetting_sources.xsum.cap=10"])
    return train(cfg, tmp_path_factory.mktemp("report") / "tiny", log=lambda *a: None).run_dir


@pytest.mark.e2e
def test_report_files_plots_and_numbers(run, capsys):
    import matplotlib.image

    assert main(["report", str(run)]) == 0
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    for png in ("train_loss.png", "val_loss.png", "sources-0.png"):  # the last: one line per source, train and validation
        img = matplotlib.image.imread(run / png)
        assert img.shape[0] >= 400 and img.shape[1] >= 700 and img.std() > 0.01  # a real picture, not blank
        assert f"]({png})" in md
    assert page.count('src="data:image/png;base64,') == 3 and "<table>" in page
    final = json.loads((run / "eval.json").read_text())
    for name, m in [*final["per_source"].items(), ("overall", final["overall"])]:
        row = re.search(rf"^\| {name} \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", md, re.M)
        assert row, name
        assert int(row[1].replace(",", "")) == m["tokens"]
        assert float(row[2]) == round(m["loss"], 4) and float(row[3]) == round(m["ppl"], 2)
        assert float(row[4]) == round(m["bpt"], 3) and float(row[5]) == round(m["bpb"], 3)
        assert f"<td>{name}</td><td>{m['tokens']:,}</td><td>{m['loss']:.4f}</td>" in page
    manifest = json.loads((run / "manifest.json").read_text())["sources"]
    for name, s in manifest.items():
        assert f"| {name} | {s['train']} | {s['val']} |" in md


@pytest.mark.e2e
def test_report_compares_several_runs(run, tmp_path):
    assert main(["report", str(run), str(run), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md.count(f"| {run.name} | finished |") == 2
    assert (tmp_path / "train_loss.png").stat().st_size > 10_000


@pytest.mark.e2e
def test_tensorboard_events_match_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    eval_rows = [r for r in rows if r["event"] == "eval"]
    tb_train = {e.step: e.value for e in acc.Scalars("train/train_loss")}
    tb_eval = {e.step: e.value for e in acc.Scalars("eval/val_loss")}
    assert sorted(tb_train) == [r["step"] for r in train_rows]
    for r in train_rows:
        assert tb_train[r["step"]] == pytest.approx(r["train_loss"], rel=1e-6)
    for r in eval_rows:
        assert tb_eval[r["step"]] == pytest.approx(r["val_loss"], rel=1e-6)


@pytest.mark.e2e
def test_forgetting_check_reports_base_vs_tuned(run):
    final = json.loads((run / "eval.json").read_text())
    assert set(final["forgetting"]) == set(final["per_source"]) | {"overall"}
    for name, r in final["forgetting"].items():
        tuned = final["overall"] if name == "overall" else final["per_source"][name]
        base = final["base"]["overall"] if name == "overall" else final["base"]["per_source"][name]
        assert r["tuned_loss"] == tuned["loss"] and r["base_loss"] == base["loss"]
        assert r["delta"] == pytest.approx(tuned["loss"] - base["loss"])
    assert final["forgetting"]["overall"]["delta"] < 0  # the adapter trained on these sources helps on them


@pytest.mark.e2e
def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])


@pytest.mark.e2e
def test_report_on_a_non_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a loramix run dir" in capsys.readouterr().err


@pytest.mark.e2e
def test_held_out_sources_are_scored_but_never_trained(run):
    final = json.loads((run / "eval.json").read_text())
    assert set(final["per_source"]) == {"tinystories", "ag_news", "squad", "imdb"}
    outside = final["forgetting_sources"]
    assert set(outside["per_source"]) == {"wikitext", "xsum"}
    assert set(outside["forgetting"]) == {"wikitext", "xsum", "overall"}
    for name, r in outside["forgetting"].items():
        tuned = outside["overall"] if name == "overall" else outside["per_source"][name]
        assert r["tuned_loss"] == pytest.approx(tuned["loss"]) and r["delta"] == pytest.approx(r["tuned_loss"] - r["base_loss"])
    assert "| wikitext |" in (run / "report.md").read_text() or main(["report", str(run)]) == 0


@pytest.mark.e2e
def test_forgetting_source_must_not_be_trained_on():
    from loramix.errors import LoramixError

    with pytest.raises(LoramixError, match="eval.forgetting_sources.squad is also a training source"):
        load_config(None, ["eval.forgetting_sources=[squad]"])
