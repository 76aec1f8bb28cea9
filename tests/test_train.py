import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

from loramix.cli import main
from loramix.config import load_config
from loramix.data.packing import Segment, collate
from loramix.evaluation import Metrics, evaluate
from loramix.loss import token_nll
from loramix.model import load_base_model
from loramix.training import lr_at, train

from conftest import REAL_DATA, ROOT, TINY, tiny_lora_model


@pytest.mark.unit
def test_schedule_warmup_then_linear_decay():
    lrs = [lr_at(s, total=10, warmup=4, peak=1.0) for s in range(10)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_at(0, total=3, warmup=100, peak=3e-4) == pytest.approx(3e-6)


@pytest.mark.unit
def test_metric_math():
    m = Metrics.of(nll=2 * math.log(2) * 10, tokens=10, nbytes=40)
    assert m.loss == pytest.approx(2 * math.log(2))
    assert m.ppl == pytest.approx(4.0)
    assert m.bpt == pytest.approx(2.0)
    assert m.bpb == pytest.approx(0.5)


def _tiny_model(seed=0):
    return tiny_lora_model(64, seed, "lora.dropout=0")


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[Segment(i % 3, rng.integers(0, 50000, n).astype(np.int32))] for i, n in enumerate(lengths)]


@pytest.mark.parity
def test_accumulation_is_token_exact():
    """Two uneven micro-batches normalised by the window's tokens give the one-batch gradient."""
    rows = _rows([30, 5, 12, 40])
    grads = []
    for split in ([rows], [rows[:1], rows[1:]], [rows[:3], rows[3:]]):
        model = _tiny_model()
        batches = [collate(r, 50256) for r in split]
        n = sum(b.n_targets for b in batches)
        for b in batches:
            (token_nll(model, b).sum() / n).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parity
def test_eval_loss_independent_of_batch_size():
    model = _tiny_model()
    rows = _rows([30, 5, 12, 40, 7, 19])
    results = [evaluate(model, rows, ["a", "b", "c"], "cpu", 50256, batch_size=bs) for bs in (1, 4, 6)]
    for r in results[1:]:
        assert r.overall.loss == pytest.approx(results[0].overall.loss, rel=1e-6)
        assert r.per_source["b"].loss == pytest.approx(results[0].per_source["b"].loss, rel=1e-6)
    assert results[0].overall.tokens == sum([29, 4, 11, 39, 6, 18])


@pytest.mark.parity
def test_token_nll_equals_full_logits_cross_entropy():
    model = _tiny_model()
    batch = collate(_rows([30, 5, 12]), 50256)
    full = torch.nn.functional.cross_entropy(
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=(batch.segment_ids > 0).long()).logits.transpose(1, 2),
        batch.targets, ignore_index=-100, reduction="none")
    ours = token_nll(model, batch)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad((ours * torch.linspace(0.5, 2, ours.numel()).view_as(ours)).sum(), params)
    g_full = torch.autograd.grad((full * torch.linspace(0.5, 2, full.numel()).view_as(full)).sum(), params)
    for a, b in zip(g_ours, g_full):  # float32 sums in another order: equal to rounding, not bit-equal
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("chunk, softcap, scale", [(1, None, 1.0), (7, None, 1.0), (1000, None, 1.0), (7, 3.0, 1.0), (7, None, 0.125), (7, 3.0, 4.0)])
def test_fused_head_loss_and_gradient(chunk, softcap, scale):
    """The fused head against autograd through plain logits, with Gemma 2's soft-capping and Granite's or
    Cohere's logit scaling too."""
    from loramix.loss import LinearCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    w = torch.randn(50, 16)
    t = torch.randint(0, 50, (23,))
    upstream = torch.rand(23)
    ours = LinearCrossEntropy.apply(h, w, t, chunk, softcap, scale)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), h)
    logits = (h @ w.T) * scale
    ref = torch.nn.functional.cross_entropy(softcap * torch.tanh(logits / softcap) if softcap else logits, t, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), h)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_run_dir_files_and_metric_rows(tiny_run):
    d = tiny_run.run_dir
    assert sorted(p.name for p in d.iterdir()) == ["adapter", "checkpoints", "config.yaml", "eval.json", "manifest.json", "metrics.jsonl", "run.json",
                                                   "tensorboard"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (d / "adapter").iterdir()}
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    plan = tiny_run.plan
    train_rows = [r for r in rows if r["event"] == "train"]
    eval_rows = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(2, plan.total_steps + 1, 2)) + ([plan.total_steps] if plan.total_steps % 2 else [])
    assert [r["step"] for r in eval_rows] == [s for s in range(4, plan.total_steps, 4)] + [plan.total_steps]
    for r in train_rows:
        assert {"step", "epoch", "lr", "train_loss", "tokens", "elapsed_s"} <= set(r)
        assert 5.0 < r["train_loss"] < 12.0
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert train_rows[-1]["tokens"] == eval_rows[-1]["tokens"]
    final = json.loads((d / "eval.json").read_text())
    assert final["overall"]["loss"] == pytest.approx(eval_rows[-1]["val_loss"])
    assert final["overall"]["ppl"] == pytest.approx(math.exp(final["overall"]["loss"]))
    assert set(final["per_source"]) == set(yaml.safe_load((d / "config.yaml").read_text())["data"]["sources"])
    for m in [final["overall"], *final["per_source"].values()]:
        assert m["tokens"] > 0 and m["bytes"] > m["tokens"]
        assert m["bpt"] == pytest.approx(m["loss"] / math.log(2))
        assert m["bpb"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / m["bytes"])
    assert final["samples_per_s"] > 0 and final["tokens_per_s"] > 0 and final["rows"] < final["samples"]
    manifest = json.loads((d / "manifest.json").read_text())["sources"]
    assert sum(s["val"] for s in manifest.values()) == final["samples"]
    status = json.loads((d / "run.json").read_text())
    assert status["status"] == "finished"
    probe = status["probe"]  # the exactness probe's verdict on the run's own model
    assert probe["loss_exact"] and probe["packing_exact"] and probe["loss_diff"] < 1e-5 and probe["packed_diff"] < 1e-5
    assert (probe["model_type"], probe["attention"], probe["documents"]) == ("gpt2", "sdpa", 3)


@pytest.mark.e2e
def test_metric_rows_carry_per_source_curves(tiny_run):
    """Each train row: the interval's loss per source, whose token-weighted mean is the row's train_loss; each
    eval row: loss, PPL and BPB per source, the last equal to eval.json's; the trackers get them all."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = tiny_run.run_dir
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    sources = list(yaml.safe_load((d / "config.yaml").read_text())["data"]["sources"])
    train_rows = [r for r in rows if r["event"] == "train"]
    for r in train_rows:
        per = r["per_source"]
        assert set(per) <= set(sources) and len(per) >= 2
        weighted = sum(m["train_loss"] * m["tokens"] for m in per.values()) / sum(m["tokens"] for m in per.values())
        assert weighted == pytest.approx(r["train_loss"], rel=1e-6)
    assert sum(m["tokens"] for r in train_rows for m in r["per_source"].values()) == train_rows[-1]["tokens"]  # every target, once
    final, last = json.loads((d / "eval.json").read_text()), [r for r in rows if r["event"] == "eval"][-1]
    assert set(last["per_source"]) == set(sources)
    for name, m in last["per_source"].items():
        assert m["val_loss"] == pytest.approx(final["per_source"][name]["loss"], rel=1e-9)
        assert m["val_bpb"] == pytest.approx(final["per_source"][name]["bpb"], rel=1e-9)
    events = EventAccumulator(str(d / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"eval/per_source/{n}/val_loss" for n in sources} <= tags and f"train/per_source/{sources[0]}/train_loss" in tags


@pytest.mark.e2e
def test_adapter_loads_in_stock_peft_with_same_logits(tiny_run):
    from peft import PeftModel

    cfg = load_config(tiny_run.run_dir / "config.yaml")
    base = load_base_model(cfg.model, cfg.data.seq_len)
    stock = PeftModel.from_pretrained(base, str(tiny_run.run_dir / "adapter")).eval()
    trained = tiny_run.model.eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13, 50256, 40]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter trained: B starts at zero


@pytest.mark.e2e
def test_eval_command_reproduces_eval_json(tiny_run, tmp_path, capsys):
    out = tmp_path / "again.json"
    assert main(["eval", str(tiny_run.run_dir), "--out", str(out), "--quiet"]) == 0
    again, saved = json.loads(out.read_text()), json.loads((tiny_run.run_dir / "eval.json").read_text())
    for name in ["overall", *saved["per_source"]]:
        a = again["overall"] if name == "overall" else again["per_source"][name]
        b = saved["overall"] if name == "overall" else saved["per_source"][name]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
    assert "overall" in capsys.readouterr().out
    assert main(["eval", str(tiny_run.run_dir), "--out", str(out)]) == 0
    assert "exactness probe: loss == the model's own" in capsys.readouterr().out


@pytest.mark.e2e
def test_eval_applies_scoring_overrides_and_records_them(tiny_run, tmp_path):
    """`eval RUN data.packing=false` scores one document per row: the same tokens and loss, and says so."""
    out = tmp_path / "unpacked.json"
    overrides = ["data.packing=false", "eval.batch_size=3", "eval.base_compare=false"]
    assert main(["eval", str(tiny_run.run_dir), *overrides, "--out", str(out), "--quiet"]) == 0
    unpacked, saved = json.loads(out.read_text()), json.loads((tiny_run.run_dir / "eval.json").read_text())
    assert unpacked["overrides"] == overrides
    assert unpacked["rows"] == unpacked["samples"] == saved["samples"] > saved["rows"]  # one document per row
    assert unpacked["batch_size"] == 3 and "forgetting" in saved and "forgetting" not in unpacked
    assert unpacked["overall"]["tokens"] == saved["overall"]["tokens"]
    assert unpacked["overall"]["loss"] == pytest.approx(saved["overall"]["loss"], rel=1e-4)


@pytest.mark.e2e
def test_eval_refuses_overrides_of_what_was_trained(tiny_run, capsys):
    assert main(["eval", str(tiny_run.run_dir), "data.seq_len=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.seq_len=32 would change what the run trained on, so eval cannot apply it" in err and "\n" not in err


@pytest.mark.e2e
def test_eval_scores_an_adapter_on_a_random_init_base(tiny_run, tmp_path, cache_dir):
    """A PEFT adapter dir whose base is a size-overridden random init: the model.* overrides build that base
    (they used to be replaced by the adapter's base name alone, which loaded pretrained gpt2)."""
    import shutil

    adapter = shutil.copytree(tiny_run.run_dir / "adapter", tmp_path / "adapter")
    meta = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**meta, "base_model_name_or_path": "gpt2"}))
    out = tmp_path / "eval.json"
    assert main(["eval", str(adapter), "-c", str(ROOT / "configs" / "demo.yaml"), *TINY, f"data.cache_dir={cache_dir}",
                 "--out", str(out), "--quiet"]) == 0
    scored = json.loads(out.read_text())
    assert scored["overall"]["tokens"] == tiny_run.eval.overall.tokens
    assert scored["overall"]["loss"] == pytest.approx(tiny_run.eval.overall.loss, rel=1e-5)


@pytest.mark.e2e
def test_same_config_same_result(tiny_run, tmp_path, cache_dir):

    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}"])
    again = train(cfg, tmp_path / "again", log=lambda *a: None)
    assert again.eval.overall.loss == tiny_run.eval.overall.loss


@pytest.mark.e2e
def test_seed_dry_run_plan(capsys, cache_dir):
    rc = main(["train", "-c", str(ROOT / "configs" / "seed.yaml"), "model.init=random", "data.local_dir=@demo",
               f"data.cache_dir={cache_dir}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trainable parameters 811,008 of 125,250,816 (0.65%); LoRA on c_attn, c_proj" in out
    assert re.search(r"exactness probe: loss == the model's own \d\.\de[-+]\d\d, packed row == documents alone \d\.\de[-+]\d\d \(", out)
    assert "squad              train    102  val    18" in out
    assert "batch: 32 documents per optimizer step (train.batch_unit=docs) = micro_batch 4 x grad_accum 8 x 1 process; at most 4 rows per forward pass" in out
    assert "optimizer steps per epoch x 3 epochs" in out


@pytest.mark.e2e
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs ../shared/data/real")
def test_seed_dry_run_on_real_samples(capsys, cache_dir, tmp_path):
    rc = main(["train", "-c", str(ROOT / "configs" / "seed.yaml"), "model.init=random", f"data.local_dir={REAL_DATA}",
               f"data.cache_dir={cache_dir}", "--dry-run", "--run-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "r").exists()
    assert "tinystories        train    850  val   150" in out
    assert "652 optimizer steps per epoch x 3 epochs -> 1,956 optimizer steps" in out
    assert "trainable parameters 811,008 of 125,250,816" in out


@pytest.mark.e2e
def test_max_steps_caps_the_plan(capsys, cache_dir):
    assert main(["train", "-c", str(ROOT / "configs" / "demo.yaml"), f"data.cache_dir={cache_dir}", "train.max_steps=5", "--dry-run"]) == 0
    assert "-> 5 optimizer steps (capped by train.max_steps=5)" in capsys.readouterr().out


@pytest.mark.unit
def test_default_run_dir_never_reuses_a_run(tmp_path):
    from loramix.artifacts import default_run_dir

    assert default_run_dir("demo", tmp_path) == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    assert default_run_dir("demo", tmp_path) == tmp_path / "demo"  # empty: free to use
    (tmp_path / "demo" / "eval.json").write_text("{}")
    assert default_run_dir("demo", tmp_path) == tmp_path / "demo-2"


@pytest.mark.unit
@pytest.mark.unit
def test_lora_dropout_drops_p_and_keeps_the_expectation():
    from loramix.model import LoraDropout

    drop = LoraDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002 and abs(y.mean().item() - 1.0) < 0.003
    assert torch.unique(y).tolist() == [0.0, torch.tensor(65536 / (65536 - 6554)).item()]
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d/dx of mask * scale * x
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the mask comes from torch's generator: a checkpoint's RNG state replays it
    assert drop.eval()(x) is x


@pytest.mark.unit
@pytest.mark.unit
def test_attach_lora_fuses_dropout_into_lora_a_except_for_dora():
    from loramix.model import DroppedLinear, LoraDropout

    model = tiny_lora_model(64, 0, "lora.dropout=0.1")
    fused = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert fused and all(isinstance(m, DroppedLinear) and m.dropout.p == 0.1 for m in fused)
    assert all(isinstance(m, torch.nn.Identity) for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
    assert all(k in model.state_dict() for k in ("base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",))
    dora = tiny_lora_model(64, 0, "lora.dropout=0.1", "lora.use_dora=true")
    assert all(isinstance(m, LoraDropout) for n, m in dora.named_modules() if n.endswith("lora_dropout.default"))
    none = tiny_lora_model(64, 0, "lora.dropout=0")
    assert not any(isinstance(m, DroppedLinear | LoraDropout | torch.nn.Dropout) for n, m in none.named_modules() if "lora_" in n)


@pytest.mark.parity
def test_dropped_linear_equals_dropout_then_linear():
    """Output and both gradients equal those of the unfused dropout(x) @ A.T under the same mask."""
    from loramix.model import DroppedLinear, LoraDropout

    a = torch.nn.Linear(48, 8, bias=False)
    fused = DroppedLinear(a, LoraDropout(0.1)).train()
    x = torch.randn(3, 20, 48, requires_grad=True)
    g = torch.randn(3, 20, 8)
    torch.manual_seed(1)
    (fused(x) * g).sum().backward()
    ours = (x.grad.clone(), a.weight.grad.clone())
    x.grad, a.weight.grad = None, None
    torch.manual_seed(1)
    keep = fused.dropout.keep(x)
    ref = torch.where(keep, x * fused.dropout.scale, 0.0) @ a.weight.T
    (ref * g).sum().backward()
    torch.testing.assert_close(ours[0], x.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], a.weight.grad, rtol=0, atol=1e-5)
    assert fused.weight is a.weight and torch.equal(fused.eval()(x), x @ a.weight.T)
