"""The model card (README.md) of a run's adapter dir and of a merged model dir.

Hugging Face reads the YAML front matter: base model, library (`peft` for an adapter, `transformers` for a
merged model), the datasets by their canonical Hub ids, tags and the LoRA settings; the license is left
to the user, who knows the terms of the base model and the data. The body holds what the run measured,
overall and per source, in the cells `loramix report` prints, from the same `EvalResult` as eval.json.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from loramix.config import Config
from loramix.data.sources import source_path
from loramix.evaluation import METRIC_COLUMNS, EvalResult, metric_rows
from loramix.records import Manifest

_LICENSE = "# license: set the license your base model and data allow (e.g. mit, apache-2.0, other)"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the model card's and the report's."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])


def model_card(cfg: Config, manifest: Manifest | None, result: EvalResult | None, targets: list[str], trainable: int | None = None,
               merged: bool = False) -> str:
    """README.md of a run's adapter dir, or with `merged` of the model dir `loramix merge` made from it;
    `targets` are the modules adapted (what lora.targets=auto resolved to)."""
    base = _hub_base(cfg)
    lo = cfg.lora
    meta = {"base_model": base, "library_name": "transformers" if merged else "peft", "pipeline_tag": "text-generation",
            "datasets": sorted({s.hub_id for n, s in cfg.data.sources.items() if source_path(n, s, cfg.data) is None}) or None,
            "tags": ["loramix", "lora", "merged" if merged else "peft"],
            "lora": {"r": lo.r, "alpha": lo.alpha, "dropout": lo.dropout, "targets": list(targets), "bias": lo.bias}}
    what = "A model merged from a LoRA adapter" if merged else "A LoRA adapter"
    intro = f"{what} for {_describe_base(cfg)}, trained with loramix on {len(cfg.data.sources)} text source(s)."
    parts = [_front_matter(meta), f"# {cfg.name}", intro, "## Training", _training(cfg, result, targets, trainable), "## Data", _data_table(cfg, manifest)]
    if result is not None:
        parts += ["## Validation metrics", _metrics_text(cfg, result, merged), markdown_table(METRIC_COLUMNS, metric_rows(result))]
    loader = _base_loader(cfg.model.name, cfg.model.gguf_file) if cfg.model.init == "pretrained" else None
    parts += ["## Use", _usage(loader, merged)]
    return "\n\n".join(parts) + "\n"


def merged_adapter_card(base: str | None, adapter: Path) -> str:
    """README.md of a model dir merged from a stock PEFT adapter dir (no loramix run behind it)."""
    meta = {"base_model": _hub_id(base), "library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["lora", "merged"]}
    return "\n\n".join([_front_matter(meta), f"# {adapter.name} (merged)",
                        f"The PEFT adapter {adapter} folded into the weights of {f'`{base}`' if base else 'its base model'}.",
                        "## Use", _usage(None, merged=True)]) + "\n"


def _front_matter(meta: dict) -> str:
    body = yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False, allow_unicode=True)
    return f"---\n{body}{_LICENSE}\n---"


def _hub_base(cfg: Config) -> str | None:
    """The base model's Hub id, if the adapter sits on published weights (not a random init)."""
    return _hub_id(cfg.model.name) if cfg.model.init == "pretrained" else None


def _hub_id(name: str | None) -> str | None:
    """`name` if it is a Hub id, None for a local model dir (which means nothing to the Hub)."""
    return None if not name or name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() else name


def _describe_base(cfg: Config) -> str:
    m = cfg.model
    if m.init == "pretrained":
        return f"`{m.name}`"
    sizes = ", ".join(f"{k}={getattr(m, k)}" for k in ("n_layer", "n_embd", "n_head") if getattr(m, k))
    return (f"a randomly initialised `{m.name}` architecture ({sizes + ', ' if sizes else ''}model.seed={m.seed}), "
            "which loramix rebuilds from the run's config.yaml")


def _training(cfg: Config, result: EvalResult | None, targets: list[str], trainable: int | None) -> str:
    lo, t, d = cfg.lora, cfg.train, cfg.data
    params = f"; {trainable:,} trainable parameters" if trainable else ""
    steps = f"{result.step:,} optimizer steps" if result is not None and result.step is not None else f"{t.epochs} epoch(s)"
    cap = f", at most {t.max_steps} steps" if t.max_steps else ""
    return "\n".join([
        f"- LoRA r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, bias {lo.bias}, on {', '.join(targets)}{params}",
        f"- {steps} ({t.epochs} epoch(s){cap}); AdamW, peak learning rate {t.lr}, weight decay {t.weight_decay}, {t.warmup_steps} warmup steps then linear "
        "decay",
        f"- batches of {t.micro_batch} x {t.grad_accum} ({t.batch_unit}); {d.seq_len}-token sequences, packing {'on' if d.packing else 'off'}; seeds: data "
        f"{d.seed}, training {t.seed}",
    ])


def _data_table(cfg: Config, manifest: Manifest | None) -> str:
    rows = []
    for name, spec in cfg.data.sources.items():
        m = manifest.sources.get(name) if manifest else None
        path = source_path(name, spec, cfg.data)
        hub = f"[{spec.hub_id}](https://huggingface.co/datasets/{spec.hub_id})" + (f" ({spec.subset})" if spec.subset else "")
        dataset = f"local file {path.name}" if path else hub
        rows.append([name, dataset, (m and m.revision) or "n/a", str(m.train) if m else "?", str(m.val) if m else "?", str(spec.weight)])
    return markdown_table(["source", "dataset", "revision", "train", "validation", "weight"], rows)


def _metrics_text(cfg: Config, result: EvalResult, merged: bool) -> str:
    where = " Measured on the adapter before merging; the merged weights give the same logits." if merged else ""
    return (f"After step {result.step}, on the {cfg.data.val_share:.0%} of each source held out from training: loss in nats per "
            f"target token, perplexity, bits per token and bits per UTF-8 byte (eval.json holds the exact values).{where}")


def _base_loader(name: str, gguf_file: str | None) -> str | None:
    """The stock transformers call that loads the base, or None where it is not published (a local model dir).
    A GGUF base loads with transformers' own GGUF reader, dequantized to fp32: the weights loramix trained on."""
    if gguf_file or name.lower().endswith(".gguf"):
        folder, file = (name, gguf_file) if gguf_file else (str(Path(name).expanduser().resolve().parent), Path(name).name)
        return f'AutoModelForCausalLM.from_pretrained("{folder}", gguf_file="{file}")  # needs `pip install gguf`'
    hub = _hub_id(name)
    return hub and f'AutoModelForCausalLM.from_pretrained("{hub}")'


def _usage(loader: str | None, merged: bool) -> str:
    if merged:
        code = 'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")'
    elif loader:
        code = (f'from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\nbase = {loader}\n'
                'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_ID")')
    else:
        return "The base model is not published: use the adapter from its run dir with loramix (`loramix generate RUN_DIR --prompt ...`)."
    return f"```python\n{code}\n```"
