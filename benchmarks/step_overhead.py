"""Host overhead per optimizer step: the training loop's time that is not the model's forward and backward.

    python benchmarks/step_overhead.py           # the seed's scale: 80,000 documents, 68,000 trained; ~3 minutes
    python benchmarks/step_overhead.py --docs 8000 --steps 20 --out /tmp/o.json --results ''

The seed preset (32 documents per step, packed rows of up to 512 tokens, micro-batches of 4) on a tiny random
GPT-2 (2 layers, width 32: its forward and backward take milliseconds, so what is left is the loop's own work)
over documents in the eight schemas made from ../shared/data/real (benchmarks/data_scale.py's corpus). It runs
`fit` for --steps optimizer steps and takes the wall time of each. The overhead per step is its wall time
less the time spent inside the forward (`token_nll`) and the backward (`Tensor.backward`) during that very
step (median over steps): building the step's batches, the target count, the loss bookkeeping, clipping,
the AdamW update, logging. Writes JSON and replaces the `step-overhead` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from data_scale import make_corpus

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--docs", type=int, default=80_000, help="documents in all, before the 15%% hold-out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "step_overhead.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = ap.parse_args()

    import torch
    from speed import write_section

    from loramix import training
    from loramix.artifacts import load_inputs
    from loramix.config import load_config
    from loramix.model import attach_lora
    from loramix.runtime import Dist

    with tempfile.TemporaryDirectory() as tmp:
        make_corpus(Path(args.real), args.docs // 8, Path(tmp) / "data")
        cfg = load_config(ROOT / "configs" / "seed.yaml", [
            "model.init=random", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"data.local_dir={Path(tmp) / 'data'}",
            f"data.cap={args.docs // 8}", f"data.cache_dir={Path(tmp) / 'cache'}", f"train.max_steps={args.steps}", "train.log_every=10",
            "train.eval_every=null", "checkpoint.every=null", "track.tensorboard=false", "train.device=cpu"])
        inputs = load_inputs(cfg, lambda base: attach_lora(base, cfg.lora, cfg.train.seed), "cpu", log=lambda *a: None)
        cfg, data, model = inputs.cfg, inputs.data, inputs.model
        plan, schedule = training.make_plan(cfg, data, model)
        (Path(tmp) / "run").mkdir()
        loop = training.Loop.start(cfg, model, inputs.tokenizer, data, plan, torch.device("cpu"), "fp32", Path(tmp) / "run", {}, Dist(),
                                   lambda *a: None, False)
        # Time inside the forward (token_nll) and the backward (Tensor.backward), per step, in the run itself.
        step_times, inside, real_step, real_nll, real_backward = [], [0.0], training._train_step, training.token_nll, torch.Tensor.backward

        def clocked(fn):
            def run(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    inside[-1] += time.perf_counter() - t
            return run

        def timed_step(*a, **kw):
            out = real_step(*a, **kw)
            step_times.append(time.perf_counter())
            inside.append(0.0)
            return out
        training._train_step, training.token_nll, torch.Tensor.backward = timed_step, clocked(real_nll), clocked(real_backward)
        start = time.perf_counter()
        training.fit(loop, schedule)
        training._train_step, training.token_nll, torch.Tensor.backward = real_step, real_nll, real_backward
        walls = [b - a for a, b in zip([start, *step_times[:-1]], step_times)][2:]  # the first steps warm up
        compute = inside[2 : len(step_times)]
        train_docs = len(data.train)
    wall, fwd_bwd = statistics.median(walls), statistics.median(compute)
    overhead = statistics.median([w - c for w, c in zip(walls, compute)])
    res = {"train_docs": train_docs, "steps": len(walls), "step_wall_ms": 1e3 * wall, "forward_backward_ms": 1e3 * fwd_bwd,
           "host_overhead_ms": 1e3 * overhead, "threads": torch.get_num_threads(), "load_1min": os.getloadavg()[0]}
    text = ("| training documents | steps timed | step wall (median) | forward + backward (median) | host overhead per step (median) |\n"
            "|---:|---:|---:|---:|---:|\n"
            f"| {train_docs:,} | {len(walls)} | {res['step_wall_ms']:.2f} ms | {res['forward_backward_ms']:.2f} ms | **{res['host_overhead_ms']:.2f} ms** |")
    print(text)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.results:
        command = " ".join(["python", "benchmarks/step_overhead.py", *sys.argv[1:]])
        write_section(Path(args.results), "step-overhead", (
            f"<!-- step-overhead -->\n## Host overhead per optimizer step\n\nMeasured {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
            f"{res['threads']} torch "
            f"threads, 1-minute load {res['load_1min']:.2f} at the end; tiny random GPT-2 (2 x 32) on the seed preset's batches. Command: `{command}`.\n\n"
            f"{text}\n<!-- /step-overhead -->"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
