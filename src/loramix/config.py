"""One typed config tree: YAML preset + dotted `key=value` overrides, validated at load by pydantic.

Every field carries a one-line doc (`loramix config --keys` prints them). Validation collects every
problem and raises once, naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from loramix.errors import LoramixError

# The seed's eight datasets, the defaults a source of that name starts from; templates use their own field names.
BUILTIN_SOURCES: dict[str, dict] = {
    "wikitext": {"hub_id": "Salesforce/wikitext", "subset": "wikitext-103-raw-v1", "template": "{text}"},
    "tinystories": {"hub_id": "roneneldan/TinyStories", "template": "{text}"},
    "ag_news": {"hub_id": "fancyzhx/ag_news", "template": "{text}"},
    "yelp_review_full": {"hub_id": "Yelp/yelp_review_full", "template": "{text}"},
    "cnn_dailymail": {"hub_id": "abisee/cnn_dailymail", "subset": "3.0.0", "template": "{article}\n\nSummary: {highlights}",
                      "prompt": "{article}\n\nSummary:"},
    "xsum": {"hub_id": "EdinburghNLP/xsum", "template": "{document}\n\nSummary: {summary}", "prompt": "{document}\n\nSummary:"},
    "squad": {"hub_id": "rajpurkar/squad", "template": "{context}\n\nQuestion: {question}\nAnswer: {answers[text][0]}",
              "prompt": "{context}\n\nQuestion: {question}\nAnswer:"},
    "imdb": {"hub_id": "stanfordnlp/imdb", "template": "{text}"},
}
# The seed's short Hub names, which the Hub only redirects: accepted, and stored as the canonical id.
HUB_ALIASES = {short: spec["hub_id"] for short, spec in BUILTIN_SOURCES.items() if spec["hub_id"].endswith("/" + short)}

DEFAULT_CACHE = "~/.cache/loramix"  # data.cache_dir's default, also where commands without a config cache GGUF bases

# Numbers in YAML may land in string fields (`subset: 3.0`); unknown keys are typos, so they fail.
_pydantic_section = dataclass(config=ConfigDict(extra="forbid", coerce_numbers_to_str=True))


def _section(cls):
    """A pydantic dataclass whose construction in code (`loramix.Config(lora={"r": "abc"})`) fails as a bad
    preset does: LoramixError with the CLI's one line, not pydantic's ValidationError."""
    cls = _pydantic_section(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self, *args, **kwargs):
        try:
            validate(self, *args, **kwargs)
        except ValidationError as e:
            where = _section_path(cls)
            errors = [{**err, "loc": (*where, *err["loc"])} for err in e.errors()]
            raise LoramixError(f"bad {cls.__name__}(...): " + "; ".join(_message(err) for err in errors)) from None

    cls.__init__ = __init__
    return cls


def _section_path(cls) -> tuple[str, ...]:
    """Where a section sits in Config (LoraConfig: ('lora',)); () for Config and for sections under a mapping."""
    for f in dataclasses.fields(Config):
        if typing.get_type_hints(Config)[f.name] is cls:
            return (f.name,)
    return ()


def _rule(ok, why: str):
    """A check that passes values `ok` accepts and otherwise fails with `why` (the message after key=value)."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(why)
        return value
    return check


# Numbers, but not YAML's yes/no/on/off/true/false, which pydantic would take for 1 and 0.
_NOT_BOOL = BeforeValidator(_rule(lambda v: not isinstance(v, bool), "must be a number, not true/false"))
Int = Annotated[int, _NOT_BOOL]
Float = Annotated[float, _NOT_BOOL]
T = TypeVar("T")
Positive = Annotated[T, Field(gt=0)]
NonNegative = Annotated[T, Field(ge=0)]
Share = Annotated[Float, Field(gt=0, lt=1)]
Unit = Annotated[Float, Field(ge=0, lt=1)]


def _bool_as_word(value: Any, handler) -> Any:
    """YAML 1.1 reads on/off/yes/no as booleans: give a word-valued field back the word (`compile: on`)."""
    if isinstance(value, bool):
        for word in ("on", "yes", "true") if value else ("off", "no", "false"):
            with contextlib.suppress(ValidationError):
                return handler(word)
    return handler(value)


Choice = Annotated[T, WrapValidator(_bool_as_word)]
Packing = Annotated[bool | Literal["auto"], BeforeValidator(_rule(lambda v: isinstance(v, bool) or v == "auto", "must be true, false or auto"))]
# `lora.targets=c_attn` means the one-name list.
Names = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]
HubId = Annotated[str, AfterValidator(lambda v: HUB_ALIASES.get(v, v))]
DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # also what `generate --device` and `serve --device` take
Device = Annotated[str, AfterValidator(_rule(DEVICES.fullmatch, "is not a device (choose one of: auto, cpu, cuda, cuda:N, mps)"))]


def F(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = dataclasses.MISSING, *, trains: bool = True, scoring: bool = False):
    """A config field with its one-line doc (pydantic's description, which `describe_keys` prints) and its roles:
    `trains`: it decides the training trajectory (the fingerprint a resume checks; `eval` cannot change it);
    `scoring`: it says how a finished run is scored, so `loramix eval RUN key=value` may override it. A
    section field's roles apply to every key under it."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"description": doc, "trains": trains, "scoring": scoring})


@_section
class ModelConfig:
    name: str = F("gpt2", "base model: a Hugging Face Hub id, a local model directory (any causal LM transformers builds; the exactness probe checks it) or "
                          "a local .gguf file")
    gguf_file: str | None = F(None, "a .gguf file in the Hub repo (or local dir) model.name, e.g. SmolLM2-135M-Instruct.Q4_1.gguf; dequantized once into "
                                    "data.cache_dir")
    init: Choice[Literal["pretrained", "random"]] = F("pretrained", "'pretrained' loads weights; 'random' builds the same architecture with seeded random "
                                                                    "weights")
    n_layer: Positive[Int] | None = F(None, "GPT-2: override the number of layers (random init only)")
    n_embd: Positive[Int] | None = F(None, "GPT-2: override the hidden width (random init only)")
    n_head: Positive[Int] | None = F(None, "GPT-2: override the number of attention heads (random init only)")
    config: dict[str, Any] = F(doc="random init only: the family's own config keys, e.g. {num_hidden_layers: 2, hidden_size: 64}", factory=dict)
    seed: Int = F(0, "seed for random init, so `eval`/`merge` rebuild the same base")
    dropout: Unit | None = F(None, "the base model's own dropout (GPT-2: 0.1 on embeddings, attention, residuals); null keeps it")
    attention: Choice[Literal["sdpa", "flash_attention_2"]] = F("sdpa", "'sdpa': block-diagonal mask for packed rows (any device); 'flash_attention_2': "
                                                                        "varlen kernels on CUDA (needs flash-attn)")


@_section
class LoraConfig:
    r: Positive[Int] = F(8, "LoRA rank")
    alpha: Positive[Float] = F(16.0, "LoRA alpha (scale = alpha / r)")
    dropout: Unit = F(0.1, "dropout on the LoRA input, in [0, 1)")
    targets: Names = F(doc="what to adapt: [auto] (GPT-2: c_attn + c_proj, the seed's; other models: every linear projection but the LM head and routers, "
                           "and MoE experts' weights with lora.dropout=0), [all-linear] (PEFT's), leaf module names like [q_proj, v_proj], or regular "
                           "expressions over full module names like ['.*\\.(q|v)_proj']", factory=lambda: ["auto"])
    bias: Choice[Literal["none", "all", "lora_only"]] = F("none", "which biases train")
    use_dora: bool = F(False, "DoRA: weight-decomposed LoRA (PEFT's use_dora)")
    use_rslora: bool = F(False, "rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)")
    init: Choice[Literal["true", "gaussian", "pissa", "olora"]] = F("true", "PEFT's init_lora_weights: true (B = 0), gaussian, pissa or olora (the last two "
                                                                            "move the principal part of the base weights into the adapter; the saved adapter "
                                                                            "is converted back to plain LoRA on the original base)")


@_section
class SourceConfig:
    hub_id: HubId | None = F(None, "Hugging Face dataset id (None: `path` must be set); the seed's short names (ag_news, xsum, ...) mean their canonical ids")
    subset: str | None = F(None, "dataset config name, e.g. 'wikitext-103-raw-v1'")
    split: str = F("train", "split to read")
    template: str = F("{text}", "Python format string over the row's fields: '{article}\\n\\nSummary: {highlights}'")
    prompt: str | None = F(None, "the prompt part of the template (a prefix of it), e.g. '{article}\\n\\nSummary:'; with data.loss_on=completion only the "
                                 "rest is scored")
    path: str | None = F(None, "local file instead of the Hub (.jsonl, .json, .csv, .parquet, .txt)")
    cap: Positive[Int] | None = F(None, "max examples from this source (default: data.cap)")
    weight: Positive[Float] = F(1.0, "training share multiplier: 2.0 repeats the source's training examples twice")


def _sources(value: Any, handler) -> dict[str, SourceConfig]:
    """`[squad, imdb]` -> mapping; a known name starts from its registry entry, others need a hub_id or a path."""
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        value = dict.fromkeys(value)
    if isinstance(value, dict):
        value = {name: {**BUILTIN_SOURCES.get(name, {}), **(spec or {})} if isinstance(spec, dict | None) else spec
                 for name, spec in value.items()}
    sources = handler(value)
    unknown = [n for n, s in sources.items() if n not in BUILTIN_SOURCES and s.hub_id is None and s.path is None]
    if unknown:
        raise PydanticCustomError("unknown_source", "unknown source", {"names": unknown})
    return sources


Sources = Annotated[dict[str, SourceConfig], WrapValidator(_sources)]


@_section
class MixConfig:
    strategy: Choice[Literal["weights", "proportions", "temperature", "adaptive"]] = F(
        "weights", "'weights': every training example as is, data.sources.<name>.weight repeating a source; 'proportions': each source's share "
                   "of the training units set by data.mix.proportions; 'temperature': shares proportional to size^(1/T); 'adaptive': shares that "
                   "move every data.mix.every steps toward the sources behind on data.mix.objective")
    unit: Choice[Literal["tokens", "docs"]] = F("tokens", "what shares count: target tokens (what the loss sees) or documents")
    proportions: dict[str, Annotated[Float, Field(ge=0, le=1)]] = F(doc="with strategy=proportions: every source's share, summing to 1, "
                                                                        "e.g. {squad: 0.5, imdb: 0.5}; with adaptive: the starting shares "
                                                                        "(default: each source's share of the training set)", factory=dict)
    temperature: Positive[Float] = F(1.0, "with strategy=temperature: T (1 = proportional to size, larger flattens toward uniform, smaller "
                                          "sharpens toward the largest source)")
    budget: Positive[Int] | None = F(None, "training units per epoch with proportions or temperature (default: as many as the sources hold); "
                                           "a source short of its share is sampled with replacement, a larger one without")
    objective: Names = F(doc="with adaptive: [worst] (lower the worst source's loss: Group DRO), [average] (the mean over sources: online data "
                             "mixing), or source names (the worst of those)", factory=lambda: ["worst"])
    every: Positive[Int] = F(10, "with adaptive: optimizer steps between weight updates")
    step: Positive[Float] = F(0.5, "with adaptive: the update's step size per nat of loss (larger moves the weights faster)")
    floor: Unit | None = F(None, "with adaptive: every source's least share, so none is ever starved (times the sources, below 1); null: 0.5 / sources, "
                                 "half the mixture uniform")
    smoothing: Unit = F(0.5, "with adaptive: weight of the previous estimate in each source's running loss (0: the last interval alone)")


@_section
class DataConfig:
    sources: Annotated[Sources, Field(min_length=1)] = F(doc="named sources; a known name (wikitext, squad, ...) fills its own defaults",
                                                         factory=lambda: {n: SourceConfig(**d) for n, d in BUILTIN_SOURCES.items()})
    local_dir: str | None = F(None, "folder of <source>.jsonl files in the original schemas, used for every source ('@demo': generated demo data)")
    cap: Positive[Int] | None = F(10000, "max examples per source (a source's own cap wins)")
    val_share: Share = F(0.15, "share of each source held out for validation, in (0, 1)")
    seq_len: Positive[Int] = F(512, "tokens per sequence")
    long_docs: Choice[Literal["truncate", "split"]] = F("truncate", "documents longer than seq_len: keep the head, or split into several sequences")
    loss_on: Choice[Literal["all", "completion"]] = F("all", "'all': loss on the whole text (the seed's); 'completion': only on what follows a source's "
                                                             "prompt (squad's answer, the summaries), in training and in the metrics")
    chat_template: bool = F(False, "format sources that have a prompt through the tokenizer's chat template (user: prompt, assistant: the rest)")
    packing: Packing = F("auto", "pack several documents per row (each attends only to itself, positions restart): 'auto' where the exactness "
                                 "probe finds packed rows exact on the model (one per row otherwise), true (stop if not exact), false (one per row)",
                         scoring=True)
    pack_window: Positive[Int] = F(2048, "with train.batch_unit=rows: documents per best-fit packing window (larger: less waste; windows follow the shuffled "
                                         "order, so sources stay mixed)")
    seed: Int = F(0, "seed for sampling and the held-out split (independent of train.seed)")
    num_proc: Positive[Int] | None = F(None, "threads that tokenize side by side (the Rust tokenizer drops the GIL); null: the cores this process may use",
                                       trains=False)
    cache_dir: str = F(DEFAULT_CACHE, "where tokenized data, generated demo data and dequantized GGUF bases are cached", trains=False, scoring=True)
    mix: MixConfig = F(doc="how much of each source trains (data.mix.strategy)", factory=MixConfig)

    def cap_for(self, spec: SourceConfig) -> int | None:
        """The cap a source is sampled to: its own, else the mixture-wide data.cap."""
        return spec.cap if spec.cap is not None else self.cap

    @property
    def workers(self) -> int:
        """data.num_proc, else the cores this process may run on."""
        return self.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@_section
class TrainConfig:
    epochs: Positive[Int] = F(3, "passes over the training split")
    max_steps: Positive[Int] | None = F(None, "stop after this many optimizer steps")
    micro_batch: Positive[Int] = F(4, "rows (of seq_len tokens) per forward pass")
    grad_accum: Positive[Int] = F(8, "micro-batches per optimizer step; the step's size is micro_batch x grad_accum in train.batch_unit")
    batch_unit: Choice[Literal["docs", "rows"]] = F("docs", "'docs': micro_batch x grad_accum documents per step, packed among themselves (the seed's steps, "
                                                            "schedule and documents per step); 'rows': that many packed rows (a fixed token budget per step)")
    lr: Positive[Float] = F(3e-4, "peak AdamW learning rate")
    weight_decay: NonNegative[Float] = F(0.01, "AdamW weight decay")
    warmup_steps: NonNegative[Int] = F(100, "linear warmup steps before linear decay to 0")
    clip: NonNegative[Float] = F(1.0, "max gradient norm (0 disables clipping)")
    precision: Choice[Literal["auto", "fp32", "fp16", "bf16"]] = F("auto", "'auto': bf16 where the GPU has it, else fp16 with a grad scaler on CUDA, fp32 on "
                                                                           "CPU (fp16 and bf16 run there too, slowly)", scoring=True)
    eval_every: Positive[Int] | None = F(None, "validate every N optimizer steps (always at the end)")
    log_every: Positive[Int] = F(10, "log the training loss every N optimizer steps")
    seed: Int = F(0, "seed for data order, dropout and LoRA init")
    resume: Choice[Literal["never", "auto"]] = F("never", "'auto' (or --resume): continue from the newest valid checkpoint in the run dir, else start it",
                                                 trains=False)
    nonfinite_patience: Positive[Int] = F(20, "stop after this many consecutive steps with non-finite loss or gradients (each one is skipped)")
    compile: Choice[Literal["auto", "on", "off"]] = F("auto", "torch.compile the transformer body: 'auto' = on CUDA only (see benchmarks/RESULTS.md for CPU)",
                                                      scoring=True)
    prefetch: Choice[Literal["auto", "on", "off"]] = F("auto", "build the next steps' batches in a DataLoader worker process while the device computes: "
                                                               "'auto' = on CUDA only", trains=False)
    device: Device = F("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", scoring=True)


@_section
class CheckpointConfig:
    every: Positive[Int] | None = F(200, "write a checkpoint every N optimizer steps (always at the end too; null: only at the end)")
    keep: Positive[Int] = F(2, "newest checkpoints kept, besides the best by validation loss")


@_section
class EvalConfig:
    batch_size: Positive[Int] | None = F(None, "rows per evaluation forward pass (default: 8 on CPU; on a GPU the largest that fits, from 128 down)")
    base_compare: bool = F(False, "at the end, also score the base model (adapter disabled) and report base vs tuned loss per source")
    forgetting_sources: Sources = F(doc="held-out sources never trained on, scored at the end by the base and the tuned model, e.g. {wikitext: {cap: 500}}",
                                    factory=dict)


@_section
class TrackConfig:
    tensorboard: bool = F(True, "write TensorBoard event files to <run dir>/tensorboard")
    wandb: bool = F(False, "log to Weights & Biases (needs `wandb` installed and logged in)")
    mlflow: bool = F(False, "log to MLflow (needs `mlflow` installed; MLFLOW_TRACKING_URI picks the server)")
    project: str = F("loramix", "W&B project / MLflow experiment name")


@_section
class Config:
    name: str = F("run", "run name; the default run dir is runs/<name>")
    model: ModelConfig = F(doc="base model", factory=ModelConfig)
    lora: LoraConfig = F(doc="LoRA adapter", factory=LoraConfig)
    data: DataConfig = F(doc="data mixture", factory=DataConfig)
    train: TrainConfig = F(doc="training loop", factory=TrainConfig)
    checkpoint: CheckpointConfig = F(doc="checkpoints and resume", factory=CheckpointConfig, trains=False)
    eval: EvalConfig = F(doc="evaluation", factory=EvalConfig, scoring=True)
    track: TrackConfig = F(doc="experiment tracking", factory=TrackConfig, trains=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, world: int = 1) -> str:
        """A short hash of what decides the training trajectory (the fields marked `trains`), saved with
        checkpoints to refuse a mismatched resume. Checkpointing, tracking, resuming, where batches are built
        and the cache dir do not change it; nor does the process count, as long as the global batch
        (micro_batch x grad_accum x processes) stays the same."""
        blob = json.dumps(_trajectory(self, world), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _trajectory(cfg: Config, world: int) -> dict:
    """The keys whose fields say `trains`, with the global batch in place of grad_accum (so the process count
    may change when micro_batch x grad_accum x processes does not)."""
    d = _with_role(cfg, "trains")
    d["train"]["global_batch"] = d["train"]["micro_batch"] * d["train"].pop("grad_accum") * world
    return d


def _with_role(section, role: str) -> dict:
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata[role]:
            value = getattr(section, f.name)
            out[f.name] = _with_role(value, role) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    """A field's value as to_dict() gives it (sources are dataclasses inside a dict)."""
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()} if isinstance(value, dict) else value


def scoring_keys(cls: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys `loramix eval RUN key=value` may override (a section's as 'eval.')."""
    keys: list[str] = []
    for f in dataclasses.fields(cls or Config):
        kind = typing.get_type_hints(cls or Config)[f.name]
        if f.metadata["scoring"]:
            keys.append(prefix + f.name + ("." if dataclasses.is_dataclass(kind) else ""))
        elif dataclasses.is_dataclass(kind):
            keys += scoring_keys(kind, prefix + f.name + ".")
    return tuple(keys)


def config_diff(a: Config, b: Config, world_a: int = 1, world_b: int = 1) -> list[str]:
    """'key: a -> b' for every trajectory-relevant key that differs."""
    fa, fb = flatten(_trajectory(a, world_a)), flatten(_trajectory(b, world_b))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a nested dict (a config's keys, as overrides name them)."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
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
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise LoramixError(f"config file {path} is not valid YAML ({first}); fix the file") from e
        if not isinstance(raw, dict):
            raise LoramixError(f"config file {path} must hold a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, what="config")


def config_from_dict(raw: Any, what: str = "saved config") -> Config:
    """Validate a raw tree (a preset with overrides, or a run dir's config.yaml) into a Config."""
    try:
        cfg = TypeAdapter(Config).validate_python(raw)
    except ValidationError as e:
        raise LoramixError(f"bad {what}: " + "; ".join(_message(err) for err in e.errors())) from e
    # Checks across sections run once every field is valid.
    problems = [f"eval.forgetting_sources.{n} is also a training source; a forgetting check needs sources the adapter never saw"
                for n in cfg.eval.forgetting_sources if n in cfg.data.sources] + _mix_problems(cfg.data)
    if problems:
        raise LoramixError(f"bad {what}: " + "; ".join(problems))
    return cfg


def _mix_problems(data: DataConfig) -> list[str]:
    mix, names = data.mix, list(data.sources)
    out = [f"data.mix.proportions.{n}: not a training source (the sources are: {', '.join(names)})" for n in mix.proportions if n not in names]
    if mix.strategy == "proportions" or (mix.strategy == "adaptive" and mix.proportions):
        missing = [n for n in names if n not in mix.proportions]
        if missing:
            out.append(f"data.mix.proportions lacks {', '.join(missing)}; give every source a share (0 leaves one out)")
        total = sum(mix.proportions.values())
        if abs(total - 1) > 1e-6:
            out.append(f"data.mix.proportions sum to {total:g}, not 1; scale them so they add up to 1")
    elif mix.proportions:
        out.append(f"data.mix.proportions applies with data.mix.strategy=proportions or adaptive, not {mix.strategy}")
    if mix.strategy == "adaptive":
        goals = mix.objective
        if goals not in (["worst"], ["average"]) and not all(n in names for n in goals):
            out.append(f"data.mix.objective={','.join(goals)}: name worst, average, or training sources (the sources are: {', '.join(names)})")
        if mix.floor is not None and len(names) * mix.floor >= 1:
            out.append(f"data.mix.floor={mix.floor:g} x {len(names)} sources leaves no share to move; lower it below {1 / len(names):g}")
        if mix.budget:
            out.append("data.mix.budget applies with proportions or temperature; an adaptive run's length is train.epochs or train.max_steps")
    if mix.strategy != "weights":
        out += [f"data.sources.{n}.weight={s.weight:g} applies with data.mix.strategy=weights; drop it or set the shares with data.mix"
                for n, s in data.sources.items() if s.weight != 1]
    return out


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LoramixError(f"override '{item}' is not key=value; write e.g. lora.r=16")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, list) and all(isinstance(name, str) for name in child):
            child = dict.fromkeys(child)  # `sources: [a, b]` shorthand: expand so a.b.c can reach into it
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise LoramixError(f"override '{item}': '{part}' is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = _override_value(parts, text)


def _override_value(parts: list[str], text: str) -> Any:
    """YAML for most fields; a string field takes the text as typed (a template like '{body}' is not YAML)."""
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    return text if value is not None and _declared(parts)[0] is str else value


def _declared(loc) -> tuple[Any, list]:
    """(bare type, constraints) at a key path, through sections, maps and lists; (None, []) if none."""
    tp: Any = Config
    for part in loc:
        tp = _unwrap(tp)[0]
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(part)
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        else:
            return None, []
    return _unwrap(tp)


def _unwrap(tp, meta: tuple = ()) -> tuple[Any, list]:
    """(bare type, Annotated metadata): `Positive[int] | None` -> (int, [FieldInfo(gt=0)])."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _unwrap(next(a for a in typing.get_args(tp) if a is not type(None)), meta)
    if typing.get_origin(tp) is Annotated:
        return _unwrap(typing.get_args(tp)[0], meta + typing.get_args(tp)[1:])
    return tp, list(meta)


# pydantic error type -> what the value must be
_MUST = {
    **dict.fromkeys(["int_type", "int_parsing", "int_from_float"], "must be an integer"),
    **dict.fromkeys(["float_type", "float_parsing"], "must be a number"),
    **dict.fromkeys(["bool_type", "bool_parsing"], "must be true or false"),
    "string_type": "must be a string", "list_type": "must be a list of names, e.g. [c_attn, c_proj]",
    "dict_type": "must be a list of names or a mapping of name: fields", "dataclass_type": "must be a mapping of keys",
    "too_short": "must name at least one entry",
}


def _message(err: dict) -> str:
    """One pydantic error as 'key=value what is allowed'."""
    loc, kind, ctx, value = err["loc"], err["type"], err.get("ctx", {}), err["input"]
    key = ".".join(map(str, loc)) or "config"
    bare, meta = _declared(loc)
    if kind in _MUST:
        return f"{key}={value!r} {_MUST[kind]}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        with contextlib.suppress(TypeError, ValueError):
            value = bare(value)  # as the field holds it: lr=0 is 0.0, '3e-4' a float
        return f"{key}={value!r} {_range_text(meta)}"
    if kind == "literal_error":
        return f"{key}={value!r} is not allowed (choose one of: {', '.join(typing.get_args(bare))})"
    if kind == "unexpected_keyword_argument":
        section = "".join(f"{p}." for p in loc[:-1]) or "top level"
        names = sorted(f.name for f in dataclasses.fields(_declared(loc[:-1])[0]))
        return f"unknown key '{key}' (allowed under {section}: {', '.join(names)})"
    if kind == "unknown_source":
        known = ", ".join(BUILTIN_SOURCES)
        return "; ".join(f"{key}.{n}: unknown source; give it a hub_id or a path, or use a known name ({known})" for n in ctx["names"])
    return f"{key}={value!r} {ctx.get('error') or err['msg']}"  # a ValueError from our checks ends the line


def _range_text(meta: list) -> str:
    """'must be > 0', 'must be in [0, 1)', ... from a field's Field(gt=..., ge=..., lt=...) bounds."""
    bounds = {k: v for info in meta for c in getattr(info, "metadata", ()) for k, v in dataclasses.asdict(c).items()}
    low = "gt" if "gt" in bounds else "ge"
    if "lt" in bounds:
        return f"must be in {'(' if low == 'gt' else '['}{bounds[low]}, {bounds['lt']})"
    return f"must be {'>' if low == 'gt' else '>='} {bounds[low]}"


def describe_keys(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for `loramix config --keys` and the README reference."""
    rows, default_obj, hints = [], cls(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value, doc = getattr(default_obj, f.name), f.metadata["description"]
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_keys(hints[f.name], prefix + f.name + ".")
        elif f.name == "sources":
            rows.append((prefix + f.name, "[" + ", ".join(value) + "]", doc))
            rows += describe_keys(SourceConfig, prefix + "sources.<name>.")
        elif f.name == "forgetting_sources":
            rows.append((prefix + f.name, "{}", doc + " (same fields as data.sources.<name>)"))
        else:
            rows.append((prefix + f.name, json.dumps(value), doc))
    return rows


def keys_markdown() -> str:
    """The config reference as a Markdown table (`loramix config --keys`; the README embeds it)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows += [f"| `{k}` | `{d}` | {doc.replace('|', '/')} |" for k, d, doc in describe_keys()]
    return "\n".join(rows)
