"""`loramix merge`: an adapter folded into its base weights, saved as a plain Hugging Face model directory.

The source is a loramix run dir (the base is rebuilt from its config and checked against the trained
one) or a stock PEFT adapter dir (the base named in its adapter_config.json). PEFT's merge respects
GPT-2's transposed Conv1D weights (`fan_in_fan_out`), so the merged model's logits equal the adapter
model's; the output loads with stock `AutoModelForCausalLM.from_pretrained`, without loramix. Its
README.md is a model card: a run's (data, settings and metrics), or for a stock adapter the base it sits on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.artifacts import RUN, adapter_base, kind_of, load_run, load_tuned
from loramix.card import merged_adapter_card, model_card
from loramix.errors import LoramixError
from loramix.files import replacing

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def merge(source: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the merged model (safetensors, config, tokenizer files, model card) to `out`, whole or not at all.

    Args:
        source: a run dir, or a stock PEFT adapter dir.
        dtype: 'fp32', 'fp16' or 'bf16': the weights' dtype in `out`.

    Raises:
        LoramixError: `out` not empty (without `overwrite`), a source that is neither, or a failed write.
    """
    source, out = Path(source), Path(out)
    if dtype not in DTYPES:
        raise LoramixError(f"dtype {dtype!r} is not one loramix merges to; use one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoramixError(f"{out} is not empty; pick another --out or pass --overwrite")
    model, tokenizer = load_tuned(source)
    card = _card(source, sorted(model.peft_config["default"].target_modules))
    merged = model.merge_and_unload().to(DTYPES[dtype])
    try:
        with replacing(out) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            (tmp / "README.md").write_text(card, encoding="utf-8")
    except OSError as e:
        raise LoramixError(f"cannot write {out} ({e.strerror or e}); free disk space or pick another --out") from e
    return out


def _card(source: Path, targets: list[str]) -> str:
    if kind_of(source) != RUN:
        return merged_adapter_card(adapter_base(source), source)
    run = load_run(source)
    return model_card(run.config, run.manifest, run.eval, targets, run.status.plan.get("trainable"), merged=True)
