"""`loramix merge`: an adapter folded into its base weights, saved as a plain Hugging Face model directory.

The source is a loramix run dir (the base is rebuilt from its config and checked against the trained
one) or a stock PEFT adapter dir (the base named in its adapter_config.json). PEFT's merge respects
GPT-2's transposed Conv1D weights (`fan_in_fan_out`), so the merged model's logits equal the adapter
model's; the output loads with stock `AutoModelForCausalLM.from_pretrained`, without loramix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from loramix import rundir
from loramix.config import ModelConfig
from loramix.errors import LoramixError
from loramix.model import base_fingerprint, load_adapter, load_base_model, load_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_run_adapter(run_dir: Path, base, adapter_name: str = "default"):
    """A run's adapter on `base`, after checking that `base` is the model the run trained.

    Raises:
        LoramixError: no adapter yet, or another base model.
    """
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise LoramixError(f"{run_dir} has no adapter yet (unfinished run?); train it to the end first")
    status = Path(run_dir) / "run.json"
    expected = rundir.read_json(status).get("base_fingerprint") if status.is_file() else None
    if expected and base_fingerprint(base) != expected:
        name = base.config.name_or_path or "the base model"
        raise LoramixError(f"{name} differs from the base {run_dir} was trained on; restore that base model")
    return load_adapter(base, adapter, adapter_name=adapter_name)


def load_tuned(source: Path, adapter_name: str = "default"):
    """(PeftModel, tokenizer) for a run dir or a stock PEFT adapter dir.

    Raises:
        LoramixError: neither kind of dir, or a base model other than the one the run trained.
    """
    source = Path(source)
    if (source / "config.yaml").is_file():
        cfg = rundir.load_run_config(source)
        return load_run_adapter(source, load_base_model(cfg.model, cfg.data.seq_len), adapter_name), load_tokenizer(cfg.model)
    if (source / "adapter_config.json").is_file():
        name = json.loads((source / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not name:
            raise LoramixError(f"{source}/adapter_config.json names no base model; set base_model_name_or_path in it")
        mc = ModelConfig(name=name)
        base = load_base_model(mc, seq_len=1)
        return load_adapter(base, source, adapter_name=adapter_name), load_tokenizer(mc)
    raise LoramixError(f"{source} is neither a loramix run dir (config.yaml) nor a PEFT adapter dir (adapter_config.json)")


def merge(source: Path, out: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the merged model (safetensors, config, tokenizer files) to `out`, whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoramixError(f"{out} is not empty; pick another --out or pass --overwrite")
    model, tokenizer = load_tuned(source)
    merged = model.merge_and_unload().to(DTYPES[dtype])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoramixError(f"cannot write {out} ({e.strerror or e}); free disk space or pick another --out") from e
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
