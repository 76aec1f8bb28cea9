"""Every family CI proves, on a tiny random-init model (tests/tiny_families.py): the README's family
table, one column per claim, each backed by a test here; and a model type no test has seen."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from crashing import kill_at
from tiny_families import FAMILIES, WINDOW, family_dir, hf_tokenizer, sample_texts

from loramix import artifacts
from loramix.cli import main
from loramix.commands import evaluate as evaluate_source
from loramix.config import load_config
from loramix.data.packing import Segment, collate
from loramix.errors import LoramixError
from loramix.generation import generate
from loramix.loss import token_nll
from loramix.model import load_base_model, load_tokenizer
from loramix.serve.sampler import Sampling

from conftest import CRASHING, ROOT

TYPES = list(FAMILIES)
# The README table's columns -> the test that backs each cell.
CELLS = {"trained": "test_trains", "eval": "test_eval_reproduces_eval_json", "merge": "test_merged_logits_equal_adapter_logits",
         "generate": "test_generate_follows_the_adapter", "serve": "test_serves_the_adapter",
         "packed == unpacked": "test_packed_equals_unpacked", "loss == stock loss": "test_loss_equals_the_stock_loss"}
IDS = [[3, 17, 250, 99, 4, 300, 12, 7]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def overrides(root, model_type, cache_dir, *extra) -> list[str]:
    return [f"model.name={family_dir(root, model_type)}", "model.init=random", "data.local_dir=@demo", "data.cap=16", "data.seq_len=64",
            f"data.cache_dir={cache_dir}", "train.epochs=1", "train.micro_batch=4", "train.grad_accum=2", "train.lr=1e-2",
            "train.warmup_steps=2", "train.log_every=1", "train.eval_every=null", "eval.batch_size=8", "eval.base_compare=false", *extra]


@pytest.fixture(scope="module")
def runs(root, cache_dir):
    """One tiny run per family, trained on first use."""
    from loramix.training import train

    done = {}

    def run(model_type):
        if model_type not in done:
            cfg = load_config(None, overrides(root, model_type, cache_dir))
            done[model_type] = train(cfg, root / f"run-{model_type}", log=lambda *a: None)
        return done[model_type]
    return run


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_trains(runs, model_type):
    result = runs(model_type)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if r["event"] == "train"]
    assert np.mean(losses[-3:]) < losses[0] - 0.05  # it learns (random init on 512 tokens: about 6.24 -> 6.13, the data's unigram level)
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    expected = ["c_attn", "c_proj"] if model_type == "gpt2" else None
    assert (sorted(saved["target_modules"]) == expected) if expected else ("lm_head" not in saved["target_modules"] and len(saved["target_modules"]) >= 3)
    assert saved["fan_in_fan_out"] == (model_type == "gpt2")


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_eval_reproduces_eval_json(runs, model_type):
    result = runs(model_type)
    again = evaluate_source(result.run_dir, log=lambda *a: None)
    assert again.overall.loss == pytest.approx(result.eval.overall.loss, rel=1e-5)
    assert (again.overall.tokens, again.overall.bytes) == (result.eval.overall.tokens, result.eval.overall.bytes)


def _stock_adapter_model(run_dir):
    from peft import PeftModel

    cfg = artifacts.load_run_config(run_dir)
    return PeftModel.from_pretrained(load_base_model(cfg.model, cfg.data.seq_len), str(run_dir / "adapter")).eval()


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_merged_logits_equal_adapter_logits(runs, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = runs(model_type).run_dir
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        expected = _stock_adapter_model(run_dir)(input_ids=torch.tensor(IDS)).logits
        torch.testing.assert_close(merged(input_ids=torch.tensor(IDS)).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_generate_follows_the_adapter(runs, model_type):
    """loramix's greedy text is the stock PEFT model's greedy continuation, token by token."""
    run_dir = runs(model_type).run_dir
    model, tok = artifacts.load_for_generation(run_dir)
    prompt = "the cat sat on"
    (text,), _ = generate(model, tok, [prompt], Sampling(max_new_tokens=3))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    stock = _stock_adapter_model(run_dir)
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, stock(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert text == tok.decode(ids[0, -3:], skip_special_tokens=True)


def _segments(tok, n=3, length=60):
    """Documents longer than the sliding window, tokenized as loramix does (BOS where the tokenizer adds one, EOS)."""
    out = []
    for text in (" ".join(sample_texts(4, seed=k)) for k in range(n)):
        ids = (tok(text)["input_ids"] + [tok.eos_token_id])[:length]
        out.append(Segment(0, np.asarray(ids, dtype=np.int32)))
    return out


def _base(root, model_type):
    cfg = load_config(None, [f"model.name={family_dir(root, model_type)}", "model.init=random"])
    return load_base_model(cfg.model, 64).eval(), load_tokenizer(cfg.model)


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_packed_equals_unpacked(root, model_type):
    model, tok = _base(root, model_type)
    segs = _segments(tok)
    assert all(len(s.tokens) > WINDOW for s in segs)
    with torch.no_grad():
        packed = token_nll(model, collate([segs], tok.eos_token_id))[0]
        start = 0
        for seg in segs:
            alone = token_nll(model, collate([[seg]], tok.eos_token_id))[0, : len(seg.tokens) - 1]
            torch.testing.assert_close(packed[start : start + len(seg.tokens) - 1], alone, rtol=0, atol=1e-5)
            start += len(seg.tokens)


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_loss_equals_the_stock_loss(root, model_type):
    model, tok = _base(root, model_type)
    (seg,) = _segments(tok, n=1)
    ids = torch.tensor(seg.tokens[None].astype(np.int64))
    with torch.no_grad():
        ours = token_nll(model, collate([[seg]], tok.eos_token_id))[0, : len(seg.tokens) - 1].mean()
        stock = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("model_type", TYPES)
def test_serves_the_adapter(runs, model_type):
    """The batching server (adapter and base rows in one batch) answers as the merged adapter does."""
    import urllib.request

    from loramix.serve.http import load_engine, running

    run_dir = runs(model_type).run_dir
    model, tok = artifacts.load_for_generation(run_dir)
    (expected,), _ = generate(model, tok, ["the market"], Sampling(max_new_tokens=4))
    engine = load_engine([run_dir], max_tokens=8, device=torch.device("cpu"), log=lambda *a: None)
    with running(engine, log=lambda *a: None) as srv:
        body = json.dumps({"model": run_dir.name, "prompt": ["the market", "the cat"], "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"{srv.url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            choices = json.loads(r.read())["choices"]
    assert choices[0]["text"] == expected


@pytest.mark.parity
def test_opt_serves_adapter_and_base_rows_in_one_batch(runs):
    """OPT's MLP folds the batch into the token dimension (PEFT's mixed batches refuse it); the gathered pass
    routes by token, so an adapter row and a base row run in the same steps, each with its own model's greedy text."""
    from loramix.serve.http import load_engine
    from loramix.serve.lora import BASE
    from loramix.serve.scheduler import Sequence

    run_dir = runs("opt").run_dir
    engine = load_engine([run_dir], max_tokens=8, device=torch.device("cpu"), log=lambda *a: None)
    assert engine.scheduler.mixes
    tok, events = engine.tokenizer, []
    prompts = {run_dir.name: "the market", BASE: "the cat sat"}
    engine.scheduler.submit([Sequence(tok(p)["input_ids"], name, Sampling(max_new_tokens=4), events.append, index=k, stream=False)
                             for k, (name, p) in enumerate(prompts.items())])
    rows = [len(engine.scheduler.step()) for _ in range(4)]
    assert rows == [2, 2, 2, 2] and not engine.scheduler.batch_size
    merged, _ = artifacts.load_for_generation(run_dir)
    base = load_base_model(artifacts.load_run_config(run_dir).model, 64).eval()
    texts = {}
    for (name, prompt), event in zip(prompts.items(), sorted(events, key=lambda e: e.index)):
        (expected,), _ = generate(merged if name == run_dir.name else base, tok, [prompt], Sampling(max_new_tokens=4))
        assert event.error is None and event.text == expected
        texts[name] = expected
    assert texts[run_dir.name] != generate(base, tok, ["the market"], Sampling(max_new_tokens=4))[0][0], "the adapter changes nothing"


@pytest.mark.unit
def test_readme_family_table():
    """The README's table is this one: every family, every column, each cell backed by a test above."""
    rows = ["| family | model type | e.g. | " + " | ".join(CELLS) + " |", "|---|---|---|" + "---|" * len(CELLS)]
    for model_type, fam in FAMILIES.items():
        rows.append(f"| {fam.name} | `{model_type}` | `{fam.example}` | " + " | ".join("yes" for _ in CELLS) + " |")
    for test in CELLS.values():
        assert callable(globals()[test]) and globals()[test].pytestmark[0].args[1] == TYPES
    block = re.search(r"<!-- families:.*?-->\n(.*?)\n<!-- /families -->", (ROOT / "README.md").read_text(), re.S)
    assert block and block[1].strip() == "\n".join(rows)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("extra, message", [
    (["model.config.hiden_size=64"], "model.config.hiden_size: not a setting of llama models; its size settings are model.config.num_hidden_layers"),
    (["model.n_layer=2"], "model.n_layer/n_embd/n_head are GPT-2's names (set them to null); for llama use model.config.num_hidden_layers"),
    (["lora.targets=[q_proj,c_attn]"], "lora.targets c_attn match no linear module of this model; its modules are: down_proj, gate_proj, k_proj, o_proj, "
                                       "q_proj, up_proj, v_proj"),
])
@pytest.mark.e2e
def test_wrong_family_settings_fail_naming_what_exists(root, cache_dir, capsys, tmp_path, extra, message):
    rc = main(["train", *overrides(root, "llama", cache_dir, *extra), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and not (tmp_path / "r").exists()


@pytest.mark.parity
def test_mixture_of_experts_adapts_the_experts_without_dropout(root, cache_dir, tmp_path):
    """Mixtral with lora.dropout=0: attention and the experts' stacked weights (PEFT's target_parameters),
    never the router; it learns, the merged model gives the adapter's logits, and the server batches one
    adapter at a time."""
    from transformers import AutoModelForCausalLM

    from loramix.serve.http import load_engine
    from loramix.training import train

    result = train(load_config(None, overrides(root, "mixtral", cache_dir, "lora.dropout=0")), tmp_path / "run", log=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert sorted(saved["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert result.plan.targets == "k_proj, o_proj, q_proj, v_proj; experts: experts.down_proj, experts.gate_up_proj"
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in trainable) and not any(".gate." in n for n in trainable)
    losses = [r["train_loss"] for r in result.metrics if r["event"] == "train"]
    assert np.mean(losses[-3:]) < losses[0] - 0.1
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(input_ids=torch.tensor(IDS)).logits
        torch.testing.assert_close(merged, _stock_adapter_model(tmp_path / "run")(input_ids=torch.tensor(IDS)).logits, rtol=0, atol=1e-4)
    assert not load_engine([tmp_path / "run"], max_tokens=8, device=torch.device("cpu"), log=lambda *a: None).scheduler.mixes


@pytest.mark.e2e
def test_a_model_type_no_test_has_seen_trains_unpacked_on_the_probes_verdict(tmp_path, capsys, cache_dir):
    """Bloom (ALiBi) cannot take loramix's packed rows: the probe says so, and the run trains one document per row."""
    from transformers import BloomConfig

    BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0).save_pretrained(str(tmp_path / "bloom"))
    hf_tokenizer("bytelevel").save_pretrained(str(tmp_path / "bloom"))
    args = ["train", f"model.name={tmp_path / 'bloom'}", "model.init=random", "data.local_dir=@demo", "data.cap=8", "data.seq_len=64",
            f"data.cache_dir={cache_dir}", "train.epochs=1", "train.micro_batch=4", "train.grad_accum=1", "eval.base_compare=false"]
    assert main([*args, "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "warning: packed rows are not exact on this bloom model (its forward fails on packed rows" in out
    assert "packed row == documents alone failed (ValueError" in out and "sequence length 64, packing off" in out
    probe = json.loads((tmp_path / "r" / "run.json").read_text())["probe"]
    assert probe["loss_exact"] and not probe["packing_exact"] and probe["loss_diff"] < 1e-5
    plan = json.loads((tmp_path / "r" / "run.json").read_text())["plan"]
    assert plan["rows_per_step"] == plan["docs_per_step"]  # one document per row
    assert main([*args, "data.packing=true", "--run-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loramix: error: packed rows are not exact on this bloom model") and "data.packing=auto" in err and "\n" not in err
    assert not (tmp_path / "r2").exists()


@pytest.mark.e2e
def test_a_model_type_without_a_causal_lm_fails_in_one_line(tmp_path, capsys, cache_dir):
    from transformers import T5Config

    T5Config(num_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32).save_pretrained(str(tmp_path / "t5"))
    rc = main(["train", f"model.name={tmp_path / 't5'}", "model.init=random", "data.local_dir=@demo", f"data.cache_dir={cache_dir}",
               "--run-dir", str(tmp_path / "r")])
    assert rc == 2 and not (tmp_path / "r").exists()
    assert "model type 't5' has no causal language model in transformers" in capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("targets, adapted", [
    (["all-linear"], {f"layers.{k}.{m}" for k in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}),
    ([r".*layers\.0\.self_attn\.(q|v)_proj"], {"layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"}),
    ([r".*\.1\.mlp\.down_proj", "q_proj"], {"layers.1.mlp.down_proj", "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"}),
])
def test_targets_take_peft_all_linear_and_regular_expressions(root, targets, adapted):
    from peft.tuners.lora import LoraLayer

    from loramix.model import attach_lora

    cfg = load_config(None, [f"model.name={family_dir(root, 'llama')}", "model.init=random", f"lora.targets={json.dumps(targets)}"])
    model = attach_lora(load_base_model(cfg.model, 64), cfg.lora, 0)
    found = {n[n.index("layers."):] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert found == adapted


@pytest.mark.unit
@pytest.mark.parametrize("targets, message", [
    ([r".*\.attn\.c_q"], "lora.targets ['.*\\\\.attn\\\\.c_q'] match no linear module of this model; its modules are: down_proj, gate_proj"),
    (["(q_proj"], "lora.targets ['(q_proj']: not a valid regular expression (missing ), unterminated subpattern"),
])
def test_targets_that_match_nothing_fail_naming_the_modules(root, targets, message):
    from loramix.model import attach_lora

    cfg = load_config(None, [f"model.name={family_dir(root, 'llama')}", "model.init=random", f"lora.targets={json.dumps(targets)}"])
    with pytest.raises(LoramixError) as e:
        attach_lora(load_base_model(cfg.model, 64), cfg.lora, 0)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.e2e
def test_seed_preset_still_targets_the_seed_modules(cache_dir, capsys):
    assert main(["train", "-c", str(ROOT / "configs" / "seed.yaml"), "model.init=random", "data.local_dir=@demo",
                 f"data.cache_dir={cache_dir}", "lora.targets=auto", "--dry-run"]) == 0
    assert "trainable parameters 811,008 of 125,250,816" in capsys.readouterr().out


# ------------------------------------------------------------------ tokenizers: bytes, BOS, completion-only loss


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece"])
def test_bytes_counted_are_the_texts_bytes(kind, tmp_path):
    """Leading-space marks, byte-fallback pieces of multi-byte characters and special tokens: every
    document's per-token bytes add up to its UTF-8 bytes, whatever the tokenizer."""
    from loramix.data.sources import Document, Documents
    from loramix.data.tokens import tokenize_documents

    tok = load_tokenizer(load_config(None).model) if kind == "gpt2" else hf_tokenizer(kind)
    texts = [*sample_texts(40, seed=3), "  two  spaces\tand tab\n", "日本語のテキスト \U0001F680", f"special {tok.eos_token} inside"]
    docs = [Document("s", i, t) for i, t in enumerate(texts)]
    tokens = tokenize_documents(Documents.of(docs), tok, str(tmp_path), log=lambda *a: None)
    assert [int(t.bytes.sum()) for t in tokens] == [len(t.encode("utf-8")) for t in texts]
    if kind == "sentencepiece":  # the Llama-style tokenizer adds BOS, which covers no text
        assert all(t.ids[0] == tok.bos_token_id and t.bytes[0] == 0 for t in tokens)
        assert any(tok.convert_ids_to_tokens(int(i)).startswith("<0x") for t in tokens for i in t.ids)  # byte fallback was exercised


@pytest.mark.unit
def test_completion_only_loss_scores_the_answer(tmp_path, cache_dir):
    """squad with data.loss_on=completion: targets are the answer tokens and EOS, in training and in the metrics."""
    from loramix.data.prepare import prepare_data

    cfg = load_config(None, ["data.local_dir=@demo", "data.sources=[squad]", "data.cap=20", f"data.cache_dir={cache_dir}", "data.loss_on=completion"])
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, log=lambda *a: None)
    from dataclasses import replace

    from loramix.data.demo import ensure_demo_data
    from loramix.data.mixture import split_sources

    demo = replace(cfg.data, local_dir=str(ensure_demo_data(cfg.data.cache_dir)))
    doc, seg = next(split_sources(demo, log=lambda *a: None)).train[0], data.train[0]
    answer = doc.text[doc.prompt :]
    assert answer.startswith(" ") and doc.text[: doc.prompt].endswith("Answer:")
    scored = tok.decode(seg.tokens[seg.first_target :].tolist())
    assert scored == answer + tok.eos_token
    assert int(seg.nbytes[seg.first_target :].sum()) == len(answer.encode("utf-8"))
    whole = prepare_data(load_config(None, ["data.local_dir=@demo", "data.sources=[squad]", "data.cap=20", f"data.cache_dir={cache_dir}"]).data, tok,
                         log=lambda *a: None)
    assert whole.train[0].first_target == 1 and sum(s.n_targets for s in data.train) < sum(s.n_targets for s in whole.train) / 3


@pytest.mark.unit
def test_chat_template_formats_prompt_and_completion(tmp_path):
    from loramix.data.sources import Document, Documents
    from loramix.data.tokens import tokenize_documents

    tok = hf_tokenizer("sentencepiece")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    doc = Document("qa", 0, "What is the capital? Answer: Paris", prompt=len("What is the capital? Answer:"))
    (tokens,) = tokenize_documents(Documents.of([doc]), tok, str(tmp_path), log=lambda *a: None, chat=True)
    text = tok.decode(tokens.ids.tolist())
    assert text.startswith("<|user|>What is the capital? Answer:\n<|assistant|>")
    assert tok.decode(tokens.ids[tokens.first_target("completion") :].tolist()) == "Paris\n</s>"


# ------------------------------------------------------------------ PEFT variants and exact resume


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["lora.use_dora=true", "lora.use_rslora=true", "lora.init=gaussian", "lora.init=pissa", "lora.init=olora"])
def test_peft_variants_resume_eval_and_merge(root, cache_dir, tmp_path, monkeypatch, variant):
    """Each variant on Llama: a crashed-and-resumed run equals an uninterrupted one bit for bit, `eval`
    reproduces its eval.json, and the merged model (a stock dir) gives the adapter's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loramix.training import train

    cfg = load_config(None, overrides(root, "llama", cache_dir, variant, "train.max_steps=4", "checkpoint.every=2"))
    whole = train(cfg, tmp_path / "whole", log=lambda *a: None)

    def crash():
        raise KeyboardInterrupt  # a crash after the step-2 checkpoint

    kill_at(monkeypatch, "step-3", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", log=lambda *a: None)
    monkeypatch.undo()
    from dataclasses import replace

    train(replace(cfg, train=replace(cfg.train, resume="auto")), tmp_path / "resumed", log=lambda *a: None)
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = evaluate_source(tmp_path / "whole", log=lambda *a: None)
    assert again.overall.loss == pytest.approx(whole.eval.overall.loss, rel=1e-4)
    assert main(["merge", str(tmp_path / "whole"), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(input_ids=torch.tensor(IDS)).logits
        torch.testing.assert_close(merged, _stock_adapter_model(tmp_path / "whole")(input_ids=torch.tensor(IDS)).logits, rtol=0, atol=1e-4)


@pytest.mark.parity
def test_killed_and_resumed_llama_run_is_bit_identical(root, cache_dir, tmp_path):
    args = ["train", *overrides(root, "llama", cache_dir, "train.max_steps=6", "checkpoint.every=2"),
            "--quiet"]

    def run(run_dir, crash=""):
        env = {**os.environ, "LORAMIX_CRASH_AT": crash}
        return subprocess.run([sys.executable, CRASHING, *args, "--run-dir", str(run_dir), "--resume"], env=env, capture_output=True, text=True)

    assert run(tmp_path / "whole").returncode == 0
    assert run(tmp_path / "killed", crash="step-3").returncode == -signal.SIGKILL
    assert run(tmp_path / "killed").returncode == 0
    whole, resumed = ((tmp_path / d / "adapter" / "adapter_model.safetensors").read_bytes() for d in ("whole", "killed"))
    assert whole == resumed
    shutil.rmtree(tmp_path / "killed")
