"""What a directory is and how to load it, and how a run directory is written: the one place every
command (train, eval, merge, generate, serve, report) asks.

Kinds of directory:
  run      a `loramix train` run dir: config.yaml, manifest.json, run.json, metrics.jsonl, and once it
           finished, adapter/ and eval.json. It describes itself: its base is rebuilt from config.yaml
           and checked against the fingerprint in run.json.
  adapter  a stock PEFT adapter dir (adapter_config.json naming its base in base_model_name_or_path),
           e.g. a run's adapter/ or one saved by `get_peft_model(...).save_pretrained`.
  model    a Hugging Face model dir (config.json): a base model, or the output of `loramix merge`.
  gguf     a .gguf file (a base model; `generate` and `serve` take it as they take a model dir).

    runs/<name>/
      config.yaml        resolved config (what `eval`, `merge`, `report` rebuild from)
      manifest.json      per-source counts and hashes of the selected example ids
      run.json           status (running / finished / failed), versions, hardware, plan, probe verdict, base fingerprint
      metrics.jsonl      one JSON object per logged event (train / eval)
      adapter/           PEFT adapter: adapter_config.json + adapter_model.safetensors + README.md (model card)
      trackers.json      the W&B / MLflow run ids a resume continues (with track.wandb or track.mlflow)
      eval.json          final validation metrics; written last, so its presence marks a finished run
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open

from loramix import checkpoint as ckpt
from loramix.config import DEFAULT_CACHE, Config, ModelConfig, load_config
from loramix.data.prepare import prepare_data
from loramix.errors import LoramixError
from loramix.evaluation import EvalResult
from loramix.files import read_json, replacing, write_atomic, write_json
from loramix.model import base_fingerprint, check_vocabulary, load_adapter, load_base_model, load_tokenizer
from loramix.probe import Verdict, probe, settle_packing
from loramix.records import Manifest, RunStatus, read_manifest, read_status
from loramix.tracking import read_metrics

RUN, ADAPTER, MODEL, GGUF = "run", "adapter", "model", "gguf"
_MARKERS = {RUN: "config.yaml", ADAPTER: "adapter_config.json", MODEL: "config.json"}
_DESCRIBED = {RUN: "a loramix run dir (config.yaml)", ADAPTER: "a PEFT adapter dir (adapter_config.json)",
              MODEL: "a model dir (config.json)", GGUF: "a .gguf file"}


def kind_of(path: Path) -> str | None:
    """'run', 'adapter' or 'model' by the file that marks each kind (checked in that order), 'gguf' for a
    .gguf file, else None."""
    if Path(path).suffix.lower() == ".gguf" and Path(path).is_file():
        return GGUF
    return next((kind for kind, marker in _MARKERS.items() if (Path(path) / marker).is_file()), None)


def require(path: Path, accept: tuple[str, ...]) -> str:
    """The kind of `path`, which must be one of `accept`.

    Raises:
        LoramixError: naming the kinds accepted and the file that marks each.
    """
    kind = kind_of(path)
    if kind not in accept:
        wanted = " nor ".join(_DESCRIBED[k] for k in accept)
        raise LoramixError(f"{path} is neither {wanted}; pass the --run-dir of a `loramix train` run" if len(accept) > 1
                           else f"{path} is not {wanted}; pass the --run-dir of a `loramix train` run")
    return kind


# ---------------------------------------------------------------- reading


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The config a run was trained with (and `overrides` applied to it).

    Raises:
        LoramixError: config.yaml is not the one the run wrote: a key missing (a truncated file, which
            defaults would silently fill) or a training key other than run.json's config fingerprint says.
    """
    require(run_dir, (RUN,))
    path = Path(run_dir) / _MARKERS[RUN]
    saved = load_config(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [f"{section}.{key}" for section, fields in saved.to_dict().items() if isinstance(fields, dict) for key in fields
               if not isinstance(raw.get(section), dict) or key not in raw[section]]
    status = read_status(run_dir)
    expected = status.config_fingerprint
    why = (f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing" if missing else
           "its training keys differ from the config fingerprint in run.json" if expected and saved.fingerprint(status.world_size) != expected
           else None)
    if why:
        raise LoramixError(f"{path} is not the config this run was trained with ({why}: damaged or edited); restore it from a copy, "
                           "or train into a new --run-dir")
    return load_config(path, overrides) if overrides else saved


def adapter_path(source: Path) -> Path:
    """The PEFT adapter dir of a run dir or adapter dir."""
    source = Path(source)
    if require(source, (RUN, ADAPTER)) == ADAPTER:
        return check_adapter(source)
    if not (source / "adapter" / _MARKERS[ADAPTER]).is_file():
        raise LoramixError(f"{source} has no adapter yet (unfinished run?); train it to the end first")
    return check_adapter(source / "adapter", source)


def _rewrite(run_dir: Path) -> str:
    """How to rewrite a finished run's adapter and eval.json: resume from the final checkpoint, if one is left."""
    last = ckpt.latest_names(run_dir)
    if not last:
        return "restore it from a copy (the run keeps no checkpoint to rewrite it from)"
    return (f"the run's checkpoint {last[-1]} still holds the trained weights: rewrite the adapter and eval.json with "
            f"`loramix train -c {Path(run_dir) / _MARKERS[RUN]} --resume --run-dir {run_dir}`")


def check_adapter(adapter_dir: Path, run_dir: Path | None = None) -> Path:
    """`adapter_dir`, once its config parses and its safetensors file is whole (the header read and the file
    as long as it says), so a damaged adapter is one line here rather than a traceback inside PEFT.

    Raises:
        LoramixError: naming the damaged file and, for a run, the checkpoint that can rewrite it.
    """
    fix = _rewrite(run_dir) if run_dir else "restore it from a copy"
    read_json(adapter_dir / _MARKERS[ADAPTER], fix)
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        try:
            with safe_open(weights, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise LoramixError(f"{weights} is damaged ({e}); {fix}") from None
    return adapter_dir


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter names (None: it names none, e.g. a random-init base)."""
    return read_json(Path(adapter_dir) / _MARKERS[ADAPTER]).get("base_model_name_or_path") or None


@dataclass
class Inputs:
    """What `train` and `eval` start from: the same tokenizer, model, probe verdict and data."""

    tokenizer: object
    model: object  # the base with its adapter attached, on the device it runs on
    base_fingerprint: str
    verdict: Verdict
    cfg: Config  # the config asked for, with data.packing settled by the probe (what the data was prepared with)
    data: object


def load_inputs(cfg: Config, attach, device="cpu", log=print) -> Inputs:
    """Base model, tokenizer, `attach(base)` (the adapter), the exactness probe on the result, then the
    data prepared as the verdict allows. The model comes first, so a model that cannot be used fails
    before any data is read.

    Raises:
        LoramixError: a model or tokenizer that cannot be loaded, or one the probe finds inexact (see
            `probe.settle_packing`).
    """
    base = load_base_model(cfg.model, cfg.data.seq_len, cfg.data.cache_dir)
    tokenizer = load_tokenizer(cfg.model, cfg.data.cache_dir)
    check_vocabulary(base, tokenizer)
    fingerprint = base_fingerprint(base)
    model = attach(base).to(device)
    verdict = probe(model)
    settled = settle_packing(cfg, verdict, log)
    data = prepare_data(settled.data, tokenizer, log, cfg.eval.forgetting_sources)
    return Inputs(tokenizer, model, fingerprint, verdict, settled, data)


def base_model_config(source: Path) -> tuple[ModelConfig, int, str]:
    """How to build the base of a run dir or adapter dir: its model config, the sequence length to check
    it for and the cache a GGUF base is dequantized into."""
    if require(source, (RUN, ADAPTER)) == RUN:
        cfg = load_run_config(source)
        return cfg.model, cfg.data.seq_len, cfg.data.cache_dir
    name = adapter_base(source)
    if name is None:
        raise LoramixError(f"{source}/adapter_config.json names no base model; set base_model_name_or_path in it")
    return ModelConfig(name=name), 1, DEFAULT_CACHE


def attach_trained(source: Path, base, adapter_name: str = "default"):
    """The adapter of a run dir or adapter dir on `base`; for a run, `base` must be the one it trained.

    Raises:
        LoramixError: no adapter yet, or a base other than the run's.
    """
    adapter = adapter_path(source)
    expected = read_status(source).base_fingerprint if kind_of(source) == RUN else None
    if expected and base_fingerprint(base) != expected:  # hashed only where a run recorded what to compare with
        name = base.config.name_or_path or "the base model"
        raise LoramixError(f"{name} differs from the base {source} was trained on; restore that base model")
    return load_adapter(base, adapter, adapter_name=adapter_name)


def load_tuned(source: Path, adapter_name: str = "default"):
    """(PeftModel, tokenizer) for a run dir or a stock PEFT adapter dir, its base rebuilt."""
    mc, seq_len, cache_dir = base_model_config(source)
    return attach_trained(source, load_base_model(mc, seq_len, cache_dir), adapter_name), load_tokenizer(mc, cache_dir)


def load_for_generation(source: Path):
    """(model in eval mode, tokenizer) from a run dir or adapter dir (the adapter merged in memory), a model
    dir or a .gguf file."""
    if require(source, (RUN, ADAPTER, MODEL, GGUF)) in (MODEL, GGUF):
        mc = ModelConfig(name=str(source))
        return load_base_model(mc, seq_len=1).eval(), load_tokenizer(mc)
    model, tokenizer = load_tuned(source)
    return model.merge_and_unload().eval(), tokenizer


def load_adapters(sources: list[Path]):
    """(PeftModel with one adapter per source, named by its dir, tokenizer, the bare base's fingerprint) for run
    dirs and adapter dirs that share one base.

    Raises:
        LoramixError: names that clash (or are 'base'), or adapters of different bases.
    """
    names = [Path(s).name for s in sources]
    if len(set(names)) != len(names) or "base" in names:
        raise LoramixError(f"adapters are named by their dirs ({', '.join(names)}): the names must differ and not be 'base'; rename a dir")
    mc, seq_len, cache_dir = base_model_config(sources[0])
    base = load_base_model(mc, seq_len, cache_dir)
    fingerprint = base_fingerprint(base)  # of the bare base, as runs record it
    model, tokenizer = attach_trained(sources[0], base, names[0]), load_tokenizer(mc, cache_dir)
    for source, name in zip(sources[1:], names[1:]):
        model.load_adapter(str(adapter_on(source, fingerprint, sources[0])), adapter_name=name)
    return model, tokenizer, fingerprint


def adapter_on(source: Path, fingerprint: str, served: Path | str = "the served base") -> Path:
    """The PEFT adapter dir of a run dir or adapter dir trained on the base whose fingerprint is `fingerprint`.

    Raises:
        LoramixError: not a run or adapter dir, or trained on another base than `served`.
    """
    require(source, (RUN, ADAPTER))
    # A run records its base's fingerprint: compare that, and build the base only for adapter dirs.
    theirs = read_status(source).base_fingerprint if kind_of(source) == RUN else None
    if theirs is None:
        theirs = base_fingerprint(load_base_model(*base_model_config(source)))
    if theirs != fingerprint:
        raise LoramixError(f"{source} was trained on another base than {served}; serve adapters of one base together")
    return adapter_path(source)


@dataclass
class Run:
    """A run dir as the report reads it."""

    name: str
    path: Path
    config: Config
    manifest: Manifest | None
    status: RunStatus
    metrics: list[dict]
    eval: EvalResult | None


def load_run(path: Path) -> Run:
    path = Path(path)
    if kind_of(path) != RUN or not (path / "metrics.jsonl").is_file():
        raise LoramixError(f"{path} is not a loramix run dir with metrics (config.yaml, metrics.jsonl); pass the --run-dir of a `loramix train` run")
    result = path / "eval.json"
    return Run(name=path.name, path=path, config=load_run_config(path), manifest=read_manifest(path), status=read_status(path), metrics=read_metrics(path),
               eval=EvalResult.from_dict(read_json(result, _rewrite(path))) if result.is_file() else None)


# ---------------------------------------------------------------- writing


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when taken: a second demo never clobbers the first."""
    path, k = root / name, 1
    while path.exists() and any(path.iterdir()):
        k += 1
        path = root / f"{name}-{k}"
    return path


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create an empty run dir; refuse to mix into an existing run unless told to replace it."""
    if path.exists() and not path.is_dir():
        raise LoramixError(f"run dir {path} is a file; pick another --run-dir")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise LoramixError(f"run dir {path} already holds a run; pick another --run-dir or pass --overwrite to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoramixError(f"cannot create run dir {path} ({e.strerror}); pick a writable --run-dir") from e
    return path


def save_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(Path(run_dir) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def save_adapter(model, run_dir: Path, card: str, initial: Path | None = None) -> Path:
    """PEFT's own save_pretrained with loramix's model card as README.md (instead of PEFT's blank
    template), renamed into place whole. With the `initial` adapter of a PiSSA or OLoRA run, PEFT
    converts the trained adapter into plain LoRA on the original base weights."""
    with replacing(Path(run_dir) / "adapter") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, path_initial_model_for_weight_conversion=initial and str(initial),
                              save_embedding_layers=False)  # LoRA never targets embeddings; "auto" reads the base's config
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(run_dir) / "adapter"


def save_initial_adapter(model, run_dir: Path) -> Path:
    """adapter-init/: a PiSSA/OLoRA adapter as initialised (deterministic, so a resumed run writes the
    same), which the final conversion to plain LoRA needs. Saved as plain LoRA init, as PEFT asks."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        with replacing(Path(run_dir) / "adapter-init") as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return Path(run_dir) / "adapter-init"


def save_eval(run_dir: Path, result: EvalResult) -> None:
    """eval.json: written last, so its presence marks a finished run."""
    write_json(Path(run_dir) / "eval.json", result.to_dict())


def environment() -> dict:
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,  # this process's GPU
    }
