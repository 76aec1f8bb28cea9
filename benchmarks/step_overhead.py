"""Host overhead per optimizer step: the training loop's time that is not the model's forward and backward.

    python benchmarks/step_overhead.py           # the seed's scale: 80,000 documents, 68,000 trained; ~2 minutes
    python benchmarks/step_overhead.py --docs 8000 --steps 20 --out /tmp/o.json --results ''

The seed preset (32 documents per step, packed rows of up to 512 tokens, micro-batches of 4) on a tiny random
GPT-2 (2 layers, width 32) over documents in the eight schemas made from ../shared/data/real (benchmarks/
data_scale.py's corpus). It runs `fit` for --steps optimizer steps with the model's forward (`token_nll`)
replaced by a stand-in that costs next to nothing but still reaches every trainable parameter (so the
backward, the clipping and the AdamW update run over all of them), and takes the wall time of each step
(median over steps, the first two left out): what is left is the loop's own work, building the step's
batches, the target count, the loss bookkeeping, clipping, the AdamW update and logging. (The real forward
and backward of this model take ~1.5 s a step, its 50k-entry head over 4 x 512 tokens; subtracting them
from the step's wall left the overhead inside their noise.) Writes JSON and replaces the `step-overhead`
section of benchmarks/RESULTS.md.
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
    from loramix.records import Fingerprints
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
        loop = training.Loop.start(cfg, model, inputs.tokenizer, data, plan, torch.device("cpu"), "fp32", Path(tmp) / "run",
                                   Fingerprints(inputs.base_fingerprint, cfg.fingerprint()), Dist(),
                                   lambda *a: None, False)
        params = [p for p in model.parameters() if p.requires_grad]

        def stand_in(model, batch):  # zero NLL per position that still reaches every trainable parameter
            return torch.zeros(batch.targets.shape) + 0.0 * sum(p.sum() for p in params)

        step_times, real_step = [], training._train_step

        def timed_step(*a, **kw):
            out = real_step(*a, **kw)
            step_times.append(time.perf_counter())
            return out
        training._train_step, training.token_nll, training._validate = timed_step, stand_in, lambda loop: None
        start = time.perf_counter()
        training.fit(loop, schedule)
        walls = [b - a for a, b in zip([start, *step_times[:-1]], step_times)][2:]  # the first steps warm up
        train_docs = len(data.train)
    res = {"train_docs": train_docs, "steps": len(walls), "host_overhead_ms": 1e3 * statistics.median(walls), "mean_ms": 1e3 * statistics.mean(walls),
           "p90_ms": 1e3 * sorted(walls)[int(0.9 * len(walls))], "threads": torch.get_num_threads(), "load_1min": os.getloadavg()[0]}
    text = ("| training documents | steps timed | host overhead per step (median) | mean | p90 |\n|---:|---:|---:|---:|---:|\n"
            f"| {train_docs:,} | {len(walls)} | **{res['host_overhead_ms']:.2f} ms** | {res['mean_ms']:.2f} ms | {res['p90_ms']:.2f} ms |")
    print(text)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.results:
        command = " ".join(["python", "benchmarks/step_overhead.py", *sys.argv[1:]])
        write_section(Path(args.results), "step-overhead", (
            f"<!-- step-overhead -->\n## Host overhead per optimizer step\n\nMeasured {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
            f"{res['threads']} torch "
            f"threads, 1-minute load {res['load_1min']:.2f} at the end; tiny random GPT-2 (2 x 32) on the seed preset's batches, its forward replaced "
            f"by a stand-in. Command: `{command}`.\n\n"
            f"{text}\n<!-- /step-overhead -->"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
