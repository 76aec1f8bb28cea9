"""The Python API: what `loramix train|eval|merge|generate|report` do, as functions with typed arguments and
results; `import loramix` exposes them (`loramix.train`, `loramix.evaluate`, ...), and `cli.py` only parses
arguments, calls them and prints. They print only through `log`, never exit the process, and raise
`LoramixError` with the one-line message the CLI prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from loramix import artifacts
from loramix.config import Config, config_from_dict, load_config, scoring_keys
from loramix.errors import LoramixError
from loramix.evaluation import EvalResult, Scorer, forgetting_check
from loramix.generation import generate as sample
from loramix.model import compile_body
from loramix.reporting import build_report
from loramix.runtime import autocast_for, init_distributed, progress_bars, resolve_device, resolve_precision
from loramix.serve.packed import pack_linears
from loramix.serve.sampler import Sampling
from loramix.training import TrainResult
from loramix.training import train as run_recipe

# What `loramix eval RUN_DIR key=value` may change: how the run is scored, never what was trained (the
# config fields marked `scoring`).
EVAL_OVERRIDES = scoring_keys()


def train(cfg: Config, run_dir: str | Path | None = None, *, dry_run: bool = False, overwrite: bool = False,
          resume: bool = False, log: Callable = print, progress: bool = True) -> TrainResult:
    """Train a LoRA adapter: data, plan, training loop, final evaluation, then the run dir's adapter (with
    its model card), metrics and eval.json. The resolved config and the plan go to `log` first.

    Args:
        cfg: a `Config`, from `load_config(preset, overrides)` or built in code.
        run_dir: where to write the run (default: runs/<name>, or runs/<name>-N when taken; with `resume`,
            runs/<name>).
        dry_run: stop after the plan; nothing is trained or written.
        overwrite: replace a run already in `run_dir`.
        resume: continue the run in `run_dir` from its newest valid checkpoint (train.resume=auto).
        log: where progress lines go (`lambda *a: None` silences them).
        progress: draw progress bars (on a terminal or in a notebook).

    Returns:
        TrainResult: `.plan`, `.eval` (final metrics), `.metrics` (metrics.jsonl rows), `.run_dir`, `.adapter`, `.model`.

    Raises:
        LoramixError: a bad config, data or run dir, named in one line with the fix.
    """
    import yaml

    if not isinstance(cfg, Config):
        raise LoramixError(f"train takes a Config, not {type(cfg).__name__}; load one with loramix.load_config('configs/demo.yaml', ['lora.r=16'])")
    cfg = config_from_dict(cfg.to_dict(), what="config")  # a Config built in code gets the checks across sections too
    if resume:
        cfg = replace(cfg, train=replace(cfg.train, resume="auto"))
    log("config:\n  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  "))
    # Resuming means this name's run dir itself.
    run_dir = run_dir or (Path("runs") / cfg.name if cfg.train.resume == "auto" else artifacts.default_run_dir(cfg.name))
    return run_recipe(cfg, Path(run_dir), dry_run=dry_run, overwrite=overwrite, log=log, progress=progress)


def eval_config(source: Path, preset: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config `evaluate` scores `source` with.

    A run dir: its own config, with overrides only of how it is scored (EVAL_OVERRIDES). A PEFT adapter
    dir: the data and settings of `preset`; the base is the one the adapter names, built with the
    `model.*` overrides given (e.g. model.init=random model.n_layer=2 for a random-init base), or the
    preset's model when the adapter names none.

    Raises:
        LoramixError: an override that would change what was trained, a preset with a run dir, or no
            preset with an adapter dir.
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


def evaluate(source: str | Path, preset: str | Path | None = None, overrides: list[str] = (), *, log: Callable = print,
             progress: bool = True) -> EvalResult:
    """Validation metrics of a run dir (from its saved config and adapter), or of a stock PEFT adapter dir
    on the data of `preset`, with the forgetting check where the config asks for it.

    Args:
        source: a run dir, or a PEFT adapter dir.
        preset: for an adapter dir, the preset whose data to score it on.
        overrides: `key=value` overrides (for a run dir, only of how it is scored: see EVAL_OVERRIDES).

    Returns:
        EvalResult: `.overall`, `.per_source` (loss, ppl, bpt, bpb, tokens, bytes), throughput; `.to_dict()` is eval.json's layout.
    """
    source = Path(source)
    cfg = eval_config(source, preset, overrides)
    dist = init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device, dist)
    inputs = artifacts.load_inputs(cfg, lambda base: artifacts.attach_trained(source, base), device, log)
    tokenizer, data, model = inputs.tokenizer, inputs.data, inputs.model
    log(inputs.verdict.describe())
    comparing = cfg.eval.base_compare or data.forgetting_rows
    # Merged into the base weights in memory, evaluation pays nothing for the LoRA side path; the
    # forgetting check needs the adapter switchable, so it keeps it apart.
    model = (model if comparing else model.merge_and_unload()).to(device)
    compile_body(model, cfg.train.compile, device)
    score = Scorer(model, device, tokenizer.eos_token_id, cfg.eval.batch_size,
                   autocast_for(device, resolve_precision(cfg.train.precision, device)), dist, progress and dist.main and progress_bars())
    result = score(data.val_rows, data.mixture.sources)
    score.progress = False
    result = forgetting_check(score, result, data.val_rows, data.mixture.sources, cfg.eval.base_compare,
                              data.forgetting_rows, data.forgetting_sources, log)
    if overrides:
        log(f"overrides applied: {' '.join(overrides)}")
    return replace(result, overrides=list(overrides) or None)


@dataclass
class Completions:
    texts: list[str]  # one per prompt, without the prompt
    tokens_per_s: float


def generate(source: str | Path, prompts: str | list[str], sampling: Sampling | None = None, *, device: str = "auto",
             stream: Callable[[str], None] | None = None, **options) -> Completions:
    """Completions of `prompts` from a run dir, a PEFT adapter dir or a model dir (e.g. a merged one).

    Args:
        sampling: how to decode (default: greedy, 64 new tokens); `options` replace its fields, e.g.
            max_new_tokens=40, temperature=0.8, top_p=0.95, seed=1, stop=("\\n",).
        stream: called with text as it is decoded (one prompt only).
    """
    sampling = replace(sampling or Sampling(), **options)
    sampling.check()  # before the model loads
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    model, tokenizer = artifacts.load_for_generation(Path(source))
    model = model.to(resolve_device(device)).eval()
    pack_linears(model)
    texts, rate = sample(model, tokenizer, prompts, sampling, stream=stream)
    return Completions(texts, rate)


def report(run_dirs: str | Path | list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.md and report.html (plots inlined) for one run dir or several, into `out` (default:
    the first run dir); returns their paths."""
    runs = [run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs
    return build_report([Path(r) for r in runs], Path(out) if out else None)


def serve_sources(sources: list[Path], host: str, port: int, max_tokens: int, device: str = "auto", max_batch: int = 32, max_queue: int = 64,
                  log=print) -> None:
    """`loramix serve`: blocks until Ctrl-C."""
    from loramix.serve.http import serve

    serve(sources, host, port, max_tokens, resolve_device(device), max_batch, max_queue, log=log)
