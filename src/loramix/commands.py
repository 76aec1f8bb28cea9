"""The commands' bodies, one function each, over the stages: what `loramix train|eval|merge|generate|
serve|report` do, with typed arguments and results. `cli.py` only parses arguments, calls these and
prints; they print nothing themselves except through `log`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loramix import artifacts
from loramix.config import Config, load_config
from loramix.errors import LoramixError
from loramix.evaluation import EvalResult, Scorer, forgetting_check, token_byte_lengths
from loramix.generation import Sampling, generate
from loramix.model import compile_body
from loramix.runtime import autocast_for, init_distributed, resolve_device, resolve_precision
from loramix.training import TrainResult, train

# What `loramix eval RUN_DIR key=value` may change: how the run is scored, never what was trained.
EVAL_OVERRIDES = ("data.packing", "data.cache_dir", "eval.", "train.device", "train.precision", "train.compile")


def train_run(preset: str | None, overrides: list[str], run_dir: Path | None = None, dry_run: bool = False,
              overwrite: bool = False, resume: bool = False, log=print, progress: bool = True) -> TrainResult:
    """`loramix train`: the resolved config is logged; a fresh run never lands in a taken run dir."""
    import yaml

    cfg = load_config(preset, list(overrides) + (["train.resume=auto"] if resume else []))
    log("config:\n  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  "))
    # Resuming means this name's run dir itself.
    run_dir = run_dir or (Path("runs") / cfg.name if cfg.train.resume == "auto" else artifacts.default_run_dir(cfg.name))
    return train(cfg, Path(run_dir), dry_run=dry_run, overwrite=overwrite, log=log, progress=progress)


def eval_config(source: Path, preset: str | None = None, overrides: list[str] = ()) -> Config:
    """The config `loramix eval` scores `source` with.

    A run dir: its own config, with overrides only of how it is scored (EVAL_OVERRIDES). A PEFT adapter
    dir: the data and settings of `preset`; the base is the one the adapter names, built with the
    `model.*` overrides given (e.g. model.init=random model.n_layer=2 for a random-init base), or the
    preset's model when the adapter names none.

    Raises:
        LoramixError: an override that would change what was trained, -c with a run dir, or no -c
            with an adapter dir.
    """
    source, overrides = Path(source), list(overrides)
    if artifacts.require(source, (artifacts.RUN, artifacts.ADAPTER)) == artifacts.RUN:
        if preset:
            raise LoramixError(f"{source} is a run dir and brings its own config; drop -c {preset}")
        fixed = [o for o in overrides if not o.partition("=")[0].startswith(EVAL_OVERRIDES)]
        if fixed:
            allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in EVAL_OVERRIDES)
            raise LoramixError(f"{fixed[0]} would change what the run trained on, so eval cannot apply it; "
                               f"only how it is scored may be overridden ({allowed})")
        return artifacts.load_run_config(source, overrides)
    if preset is None:
        raise LoramixError(f"{source} is a PEFT adapter dir: name the data to score it on, e.g. loramix eval {source} -c configs/demo.yaml")
    cfg = load_config(preset, overrides)
    base = artifacts.adapter_base(source)
    if base is None:
        return cfg
    model_overrides = [o for o in overrides if o.startswith("model.")]
    return replace(cfg, model=load_config(None, [f"model.name={base}", *model_overrides]).model)


def evaluate_source(source: Path, preset: str | None = None, overrides: list[str] = (), log=print, progress: bool = False) -> EvalResult:
    """`loramix eval`: validation metrics of a run dir (from its saved config and adapter) or of a stock
    PEFT adapter dir on the data of `preset`, with the forgetting check where the config asks for it."""
    source = Path(source)
    cfg = eval_config(source, preset, overrides)
    dist = init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device, dist)
    tokenizer, data, base = artifacts.load_inputs(cfg, log)
    model = artifacts.attach_trained(source, base)
    comparing = cfg.eval.base_compare or data.forgetting_rows
    # Merged into the base weights in memory, evaluation pays nothing for the LoRA side path; the
    # forgetting check needs the adapter switchable, so it keeps it apart.
    model = (model if comparing else model.merge_and_unload()).to(device)
    compile_body(model, cfg.train.compile, device)
    score = Scorer(model, token_byte_lengths(tokenizer), device, tokenizer.eos_token_id, cfg.eval.batch_size,
                   autocast_for(device, resolve_precision(cfg.train.precision, device)), dist, progress and dist.main)
    result = score(data.val_rows, data.mixture.sources)
    score.progress = False
    result = forgetting_check(score, result, data.val_rows, data.mixture.sources, cfg.eval.base_compare,
                              data.forgetting_rows, data.forgetting_sources, log)
    if overrides:
        log(f"overrides applied: {' '.join(overrides)}")
    return replace(result, overrides=list(overrides) or None)


def generate_text(source: Path, prompts: list[str], sampling: Sampling, device: str = "auto", stream=None) -> tuple[list[str], float]:
    """`loramix generate`: completions of `prompts` from a run, adapter or model dir, and tokens/s."""
    sampling.check()  # before the model loads
    model, tokenizer = artifacts.load_for_generation(source)
    return generate(model.to(resolve_device(device)).eval(), tokenizer, prompts, sampling, stream=stream)


def serve_sources(sources: list[Path], host: str, port: int, max_tokens: int, device: str = "auto", log=print) -> None:
    """`loramix serve`: blocks until Ctrl-C."""
    from loramix.serve import serve

    serve(sources, host, port, max_tokens, resolve_device(device), log=log)
