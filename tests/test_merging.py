"""Merge and interop: merged dirs load in stock transformers with the adapter model's logits; stock PEFT adapters work."""

import pytest
import torch

from loramix.cli import main

from conftest import ROOT

IDS = torch.tensor([[464, 3290, 318, 257, 1332, 13, 50256, 40, 1101, 3772]])


@pytest.mark.e2e
def test_merged_dir_loads_in_stock_transformers_with_equal_logits(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_run.run_dir), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, tiny_run.model.eval()(input_ids=IDS).logits, rtol=0, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out))("Hello world")["input_ids"] == [15496, 995]


@pytest.mark.e2e
def test_merge_to_half_precision_and_refuses_a_full_dir(tiny_run, tmp_path, capsys):
    out = tmp_path / "half"
    assert main(["merge", str(tiny_run.run_dir), "--out", str(out), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert main(["merge", str(tiny_run.run_dir), "--out", str(out)]) == 2
    assert "is not empty; pick another --out or pass --overwrite" in capsys.readouterr().err


@pytest.mark.e2e
def test_stock_peft_adapter_can_be_merged_by_loramix(tmp_path, cache_dir):
    """An adapter made by stock PEFT (get_peft_model + save_pretrained) on a stock GPT-2 dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(str(base_dir))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter: B is zero at init
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and f"The PEFT adapter {tmp_path / 'adapter'} folded into" in card
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=IDS).logits
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=0, atol=1e-4)
        assert (expected - AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()(input_ids=IDS).logits).abs().max() > 1e-3
    # ... and evaluated (on the data of a preset) and sampled by loramix
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "adapter"), "-c", str(ROOT / "configs" / "demo.yaml"), "data.seq_len=64",
                 f"data.cache_dir={cache_dir}", "--out", str(out), "--quiet"]) == 0
    import json

    metrics = json.loads(out.read_text())
    assert len(metrics["per_source"]) == 8 and metrics["overall"]["tokens"] > 0 and metrics["overall"]["loss"] > 0
    from loramix.artifacts import load_for_generation
    from loramix.generation import generate
    from loramix.serve.sampler import Sampling

    model, tok = load_for_generation(tmp_path / "adapter")
    (text,), _ = generate(model, tok, ["Hello"], Sampling(max_new_tokens=3))
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = peft_model(input_ids=ids).logits[0, -1].argmax()
    assert tok(text)["input_ids"][0] == int(first)


@pytest.mark.e2e
def test_merge_of_something_else(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is neither a loramix run dir (config.yaml) nor a PEFT adapter dir" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_run_on_another_base_is_refused(tiny_run, tmp_path, capsys):
    """run.json records the base's fingerprint: a base rebuilt differently is named, not silently used."""
    import json
    import shutil

    run = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**status, "base_fingerprint": "0" * 16}))
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
    assert "differs from the base" in capsys.readouterr().err and not (tmp_path / "merged").exists()
