"""One typed config tree: YAML preset + dotted `key=value` overrides, validated at load.

Every field carries a one-line doc (`loramix config --keys` prints them). Validation collects every
problem and raises once, naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loramix.data.sources import BUILTIN_SOURCES
from loramix.errors import LoramixError


def F(default: Any = dataclasses.MISSING, doc: str = "", check: str | None = None, factory=None):
    """A config field with its doc and an optional check ('pos' > 0, 'nonneg' >= 0, 'share' in (0, 1))."""
    meta = {"doc": doc, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = F("gpt2", "base model: a Hugging Face Hub id or a local model directory")
    init: Literal["pretrained", "random"] = F("pretrained", "'pretrained' loads weights; 'random' builds the same architecture with seeded random weights")
    n_layer: int | None = F(None, "override the number of layers (random init only)", "pos")
    n_embd: int | None = F(None, "override the hidden width (random init only)", "pos")
    n_head: int | None = F(None, "override the number of attention heads (random init only)", "pos")
    seed: int = F(0, "seed for random init, so `eval`/`merge` rebuild the same base")
    dropout: float | None = F(None, "the base model's own dropout (GPT-2: 0.1 on embeddings, attention, residuals); null keeps it", "unit")
    attention: Literal["sdpa", "flash_attention_2"] = F("sdpa", "'sdpa': block-diagonal mask for packed rows (any device); 'flash_attention_2': varlen kernels on CUDA (needs flash-attn)")


@dataclass
class LoraConfig:
    r: int = F(8, "LoRA rank", "pos")
    alpha: float = F(16.0, "LoRA alpha (scale = alpha / r)", "pos")
    dropout: float = F(0.1, "dropout on the LoRA input, in [0, 1)", "unit")
    targets: list[str] = F(doc="module names to adapt ('c_proj' hits both attention and MLP projections)", factory=lambda: ["c_attn", "c_proj"])
    bias: Literal["none", "all", "lora_only"] = F("none", "which biases train")


@dataclass
class SourceConfig:
    hub_id: str | None = F(None, "Hugging Face dataset id (None: `path` must be set)")
    subset: str | None = F(None, "dataset config name, e.g. 'wikitext-103-raw-v1'")
    split: str = F("train", "split to read")
    template: str = F("{text}", "Python format string over the row's fields: '{article}\\n\\nSummary: {highlights}'")
    path: str | None = F(None, "local file instead of the Hub (.jsonl, .json, .csv, .parquet, .txt)")
    cap: int | None = F(None, "max examples from this source (default: data.cap)", "pos")
    weight: float = F(1.0, "training share multiplier: 2.0 repeats the source's training examples twice", "pos")


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = F(doc="named sources; a known name (wikitext, squad, ...) fills its own defaults", check="nonempty", factory=lambda: {n: SourceConfig(**d) for n, d in BUILTIN_SOURCES.items()})
    local_dir: str | None = F(None, "folder of <source>.jsonl files in the original schemas, used for every source ('@demo': generated demo data)")
    cap: int | None = F(10000, "max examples per source (a source's own cap wins)", "pos")
    val_share: float = F(0.15, "share of each source held out for validation, in (0, 1)", "share")
    seq_len: int = F(512, "tokens per sequence", "pos")
    long_docs: Literal["truncate", "split"] = F("truncate", "documents longer than seq_len: keep the head, or split into several sequences")
    packing: bool = F(True, "pack several documents per row (each attends only to itself, positions restart); false pads one per row")
    pack_window: int = F(2048, "documents per best-fit packing window (larger: less waste; windows follow the shuffled order, so sources stay mixed)", "pos")
    seed: int = F(0, "seed for sampling and the held-out split (independent of train.seed)")
    cache_dir: str = F("~/.cache/loramix", "where tokenized data and generated demo data are cached")


@dataclass
class TrainConfig:
    epochs: int = F(3, "passes over the training split", "pos")
    max_steps: int | None = F(None, "stop after this many optimizer steps", "pos")
    micro_batch: int = F(4, "rows (of seq_len tokens) per forward pass", "pos")
    grad_accum: int = F(8, "micro-batches per optimizer step; the step's size is micro_batch x grad_accum in train.batch_unit", "pos")
    batch_unit: Literal["docs", "rows"] = F("docs", "'docs': micro_batch x grad_accum documents per step on average, in packed rows (the seed's step count and schedule); 'rows': that many packed rows (a fixed token budget per step)")
    lr: float = F(3e-4, "peak AdamW learning rate", "pos")
    weight_decay: float = F(0.01, "AdamW weight decay", "nonneg")
    warmup_steps: int = F(100, "linear warmup steps before linear decay to 0", "nonneg")
    clip: float = F(1.0, "max gradient norm (0 disables clipping)", "nonneg")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = F("auto", "'auto': bf16 where the GPU has it, else fp16 with a grad scaler on CUDA, fp32 on CPU")
    eval_every: int | None = F(None, "validate every N optimizer steps (always at the end)", "pos")
    log_every: int = F(10, "log the training loss every N optimizer steps", "pos")
    seed: int = F(0, "seed for data order, dropout and LoRA init")
    resume: Literal["never", "auto"] = F("never", "'auto' (or --resume): continue from the newest valid checkpoint in the run dir, else start it")
    nonfinite_patience: int = F(20, "stop after this many consecutive steps with non-finite loss or gradients (each one is skipped)", "pos")
    compile: Literal["auto", "on", "off"] = F("auto", "torch.compile the transformer body: 'auto' = on CUDA only (see benchmarks/RESULTS.md for CPU)")
    device: str = F("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")


@dataclass
class CheckpointConfig:
    every: int | None = F(200, "write a checkpoint every N optimizer steps (always at the end too; null: only at the end)", "pos")
    keep: int = F(2, "newest checkpoints kept, besides the best by validation loss", "pos")


@dataclass
class EvalConfig:
    batch_size: int | None = F(None, "rows per evaluation forward pass (default: 8 on CPU; on a GPU the largest that fits, from 128 down)", "pos")
    base_compare: bool = F(False, "at the end, also score the base model (adapter disabled) and report base vs tuned loss per source")
    forgetting_sources: dict[str, SourceConfig] = F(doc="held-out sources never trained on, scored at the end by the base and the tuned model, e.g. {wikitext: {cap: 500}}", factory=dict)


@dataclass
class TrackConfig:
    tensorboard: bool = F(True, "write TensorBoard event files to <run dir>/tensorboard")
    wandb: bool = F(False, "log to Weights & Biases (needs `wandb` installed and logged in)")
    mlflow: bool = F(False, "log to MLflow (needs `mlflow` installed; MLFLOW_TRACKING_URI picks the server)")
    project: str = F("loramix", "W&B project / MLflow experiment name")


@dataclass
class Config:
    name: str = F("run", "run name; the default run dir is runs/<name>")
    model: ModelConfig = F(doc="base model", factory=ModelConfig)
    lora: LoraConfig = F(doc="LoRA adapter", factory=LoraConfig)
    data: DataConfig = F(doc="data mixture", factory=DataConfig)
    train: TrainConfig = F(doc="training loop", factory=TrainConfig)
    checkpoint: CheckpointConfig = F(doc="checkpoints and resume", factory=CheckpointConfig)
    eval: EvalConfig = F(doc="evaluation", factory=EvalConfig)
    track: TrackConfig = F(doc="experiment tracking", factory=TrackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, world: int = 1) -> str:
        """A short hash of what decides the training trajectory, saved with checkpoints to refuse a
        mismatched resume. How often to checkpoint and whether to resume do not change it; nor does the
        process count, as long as the global batch (micro_batch x grad_accum x processes) stays the same."""
        blob = json.dumps(_trajectory(self, world), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _trajectory(cfg: Config, world: int) -> dict:
    d = cfg.to_dict()
    d.pop("checkpoint")
    d.pop("track")
    d["train"].pop("resume")
    d["train"]["global_batch"] = d["train"]["micro_batch"] * d["train"].pop("grad_accum") * world
    return d


def config_diff(a: Config, b: Config, world_a: int = 1, world_b: int = 1) -> list[str]:
    """'key: a -> b' for every trajectory-relevant key that differs."""
    fa, fb = _flatten(_trajectory(a, world_a)), _flatten(_trajectory(b, world_b))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML preset (or the defaults), apply `a.b=value` overrides, validate, return the tree.

    Raises:
        LoramixError: unreadable preset, malformed override, unknown key or bad value (all listed).
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LoramixError(f"config file {path} does not exist; pass a preset such as configs/demo.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise LoramixError(f"config file {path} is not valid YAML ({_first_line(e)}); fix the file") from e
        if not isinstance(raw, dict):
            raise LoramixError(f"config file {path} must hold a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, what="config")


def config_from_dict(raw: dict, what: str = "saved config") -> Config:
    """Validate a raw tree (a preset with overrides, or a run dir's config.yaml) into a Config."""
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    for name in set(cfg.eval.forgetting_sources) & set(cfg.data.sources):
        errors.append(f"eval.forgetting_sources.{name} is also a training source; a forgetting check needs sources the adapter never saw")
    if errors:
        raise LoramixError(f"bad {what}: " + "; ".join(errors))
    return cfg


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class _Override(typing.NamedTuple):
    """A command-line value: its text for string fields (a template like '{body}' is not YAML), parsed otherwise."""

    text: str
    value: Any


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LoramixError(f"override '{item}' is not key=value; write e.g. lora.r=16")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, _Override):
            child = child.value
        if isinstance(child, list):  # `sources: [a, b]` shorthand: expand so a.b.c can reach into it
            child = {name: {} for name in child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise LoramixError(f"override '{item}': '{part}' is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = _Override(text, value)


def _build(cls, raw: Any, prefix: str, errors: list[str]):
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            errors.append(f"unknown key '{prefix}{key}' (allowed under {prefix or 'top level'}: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        kwargs[f.name] = _convert(hints[f.name], raw[f.name], prefix + f.name, errors, f.metadata.get("check"))
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable when a converted value was rejected above
        errors.append(str(e))
        return cls()


_CHECKS = {
    "pos": (lambda v: v > 0, "must be > 0"),
    "nonneg": (lambda v: v >= 0, "must be >= 0"),
    "share": (lambda v: 0 < v < 1, "must be in (0, 1), e.g. 0.15"),
    "unit": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
}


def _convert(tp, value, key: str, errors: list[str], check: str | None = None):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if (value.value if isinstance(value, _Override) else value) is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _convert(tp, value, key, errors, check)
    if isinstance(value, _Override):
        value = value.text if tp is str else value.value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}={value!r} is not allowed (choose one of: {', '.join(map(str, args))})")
            return args[0]
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f"{key}={value!r} must be a list of names, e.g. [c_attn, c_proj]")
            return []
        return value
    if origin is dict:  # data.sources: name -> SourceConfig, known names filled from the registry
        if isinstance(value, list):
            value = {name: {} for name in value}
        if not isinstance(value, dict) or (not value and check == "nonempty"):
            errors.append(f"{key} must name at least one source, e.g. [wikitext, squad]")
            return {}
        out = {}
        for name, spec in value.items():
            spec = {} if spec is None else spec
            if not isinstance(spec, dict):
                errors.append(f"{key}.{name}: expected a mapping of source fields, got {spec!r}")
                continue
            if name not in BUILTIN_SOURCES and "hub_id" not in spec and "path" not in spec:
                errors.append(f"{key}.{name}: unknown source; give it a hub_id or a path, or use a known name ({', '.join(BUILTIN_SOURCES)})")
            out[str(name)] = _build(args[1], {**BUILTIN_SOURCES.get(name, {}), **spec}, f"{key}.{name}.", errors)
        return out
    value = _scalar(tp, value, key, errors)
    if check and value is not None and isinstance(value, (int, float)):
        ok, why = _CHECKS[check]
        if not ok(value):
            errors.append(f"{key}={value!r} {why}")
    return value


def _scalar(tp, value, key: str, errors: list[str]):
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}={value!r} must be true or false")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{key}={value!r} must be an integer")
        return 0
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{key}={value!r} must be a number")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}={value!r} must be a string")
        return ""
    raise TypeError(f"unsupported config type {tp} for {key}")


def describe_keys(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for `loramix config --keys` and the README reference."""
    rows = []
    default_obj = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default_obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_keys(hints[f.name], prefix + f.name + ".")
        elif f.name == "sources":
            rows.append((prefix + f.name, "[" + ", ".join(value) + "]", f.metadata["doc"]))
            rows += describe_keys(SourceConfig, prefix + "sources.<name>.")
        elif f.name == "forgetting_sources":
            rows.append((prefix + f.name, "{}", f.metadata["doc"] + " (same fields as data.sources.<name>)"))
        else:
            rows.append((prefix + f.name, json.dumps(value), f.metadata["doc"]))
    return rows


def keys_markdown() -> str:
    """The config reference as a Markdown table (`loramix config --keys`; the README embeds it)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows += [f"| `{k}` | `{d}` | {doc.replace('|', '/')} |" for k, d, doc in describe_keys()]
    return "\n".join(rows)
