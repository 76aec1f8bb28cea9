"""`loramix merge`: an adapter folded into its base weights, saved as a plain Hugging Face model directory.

The source is a loramix run dir (the base is rebuilt from its config and checked against the trained
one) or a stock PEFT adapter dir (the base named in its adapter_config.json). PEFT's merge respects
GPT-2's transposed Conv1D weights (`fan_in_fan_out`), so the merged model's logits equal the adapter
model's; the output loads with stock `AutoModelForCausalLM.from_pretrained`, without loramix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.artifacts import load_tuned
from loramix.errors import LoramixError
from loramix.files import replacing

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def merge(source: Path, out: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the merged model (safetensors, config, tokenizer files) to `out`, whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoramixError(f"{out} is not empty; pick another --out or pass --overwrite")
    model, tokenizer = load_tuned(source)
    merged = model.merge_and_unload().to(DTYPES[dtype])
    try:
        with replacing(out) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    except OSError as e:
        raise LoramixError(f"cannot write {out} ({e.strerror or e}); free disk space or pick another --out") from e
    return out
