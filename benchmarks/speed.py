"""loramix against the seed's setup (HF Trainer + PEFT, 512-token rows) on the same documents and weights.

    python benchmarks/speed.py                      # ~10 minutes on 2 CPU cores
    python benchmarks/speed.py --layers 12 --width 768 --heads 12 --docs-per-source 1250   # GPT-2 124M, GPU

Training: the seed-style baseline (Trainer, LoRA as in the seed, truncation to 512, padding to 512; and the
same with dynamic padding) and `loramix train` each train one epoch over the same documents from the same
initial weights (a random-init GPT-2 of the given size with GPT-2's real vocabulary). Reported: documents/s
(overall, and the median over the epoch's three thirds), real tokens/s, peak memory, and the token-weighted
validation loss afterwards. Evaluation: `Trainer.evaluate()` and `loramix eval` on the same adapter,
repeated; samples/s (median) and the loss, which must agree to 1e-4 over the same tokens.

Each method runs in its own process (so peak memory is its own). Prints a table, writes JSON, and replaces
the matching section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["loramix", "trainer-dynamic", "trainer-max"]


# ----------------------------------------------------------------------------- shared set-up


def overrides(spec: dict) -> list[str]:
    return [
        "model.init=random", f"model.n_layer={spec['layers']}", f"model.n_embd={spec['width']}", f"model.n_head={spec['heads']}",
        f"data.local_dir={spec['data']}", f"data.cap={spec['docs_per_source']}", f"data.cache_dir={spec['work']}/cache",
        "train.epochs=1", f"train.lr={spec['lr']}", f"train.warmup_steps={spec['warmup']}", "train.log_every=1",
        "train.eval_every=null", "checkpoint.every=null", f"train.device={spec['device']}", *spec.get("extra", []),
    ]


def load(spec: dict):
    """Config, tokenizer, prepared data and the baseline's initial LoRA model: loramix's initial weights,
    with GPT-2's stock activation modules put back (loramix fuses the GELU; the seed's setup did not)."""
    from loramix.artifacts import load_inputs
    from loramix.config import load_config
    from loramix.model import attach_lora

    cfg = load_config(ROOT / "configs" / "seed.yaml", overrides(spec))
    inputs = load_inputs(cfg, lambda base: attach_lora(stock_activations(base), cfg.lora, cfg.train.seed), log=lambda *a: None)
    return inputs.cfg, inputs.tokenizer, inputs.data, inputs.model


def stock_activations(model):
    from transformers.activations import NewGELUActivation

    for block in model.transformer.h:
        block.mlp.act = NewGELUActivation()
    return model


def peak_memory_mb(device: str) -> float:
    """GPU: peak allocated by torch; CPU: the process's peak resident set (imports and model included)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thirds(step_times: list[float], step_docs: list[int], start: float) -> float:
    """Median documents/s over the three thirds of the epoch's steps (noise on a shared CPU is high)."""
    n = len(step_times)
    cuts = [0, n // 3, 2 * n // 3, n]
    rates = []
    for a, b in zip(cuts, cuts[1:]):
        t0 = start if a == 0 else step_times[a - 1]
        if b > a:
            rates.append(sum(step_docs[a:b]) / (step_times[b - 1] - t0))
    return statistics.median(rates)


def token_loss(model, segments, device: str) -> float:
    """Reference: each document alone through the plain forward, summed CE over its labels / label count."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for seg in segments:
            ids = torch.tensor(seg.tokens[None], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(seg.tokens) - 1
    return nll / count


# ----------------------------------------------------------------------------- workers


def worker_loramix(spec: dict) -> dict:
    from loramix.commands import evaluate
    from loramix.config import load_config
    from loramix.training import train

    cfg = load_config(ROOT / "configs" / "seed.yaml", overrides(spec))
    result = train(cfg, Path(spec["work"]) / "loramix-run", log=lambda *a: None)
    peak = peak_memory_mb(spec["device"])
    rows = [json.loads(x) for x in (Path(spec["work"]) / "loramix-run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "train"]
    times = [r["elapsed_s"] for r in steps]
    cumulative = [r["docs"] for r in steps]
    docs = [b - a for a, b in zip([0] + cumulative, cumulative)]
    seconds = times[-1]
    # The validation pass alone (the seed preset's forgetting check would score the base model too).
    evals = [evaluate(Path(spec["work"]) / "loramix-run", overrides=["eval.base_compare=false"], log=lambda *a: None)
             for _ in range(spec["eval_reps"])]
    return {
        "train_seconds": seconds, "docs": steps[-1]["docs"], "steps": len(steps),
        "docs_per_s": steps[-1]["docs"] / seconds, "docs_per_s_median_third": thirds(times, docs, 0.0),
        "real_tokens": sum(len(s.tokens) for s in _train_segments(spec)),
        "val_loss": result.eval.overall.loss, "peak_mb": peak,
        "eval_samples_per_s": statistics.median(e.samples_per_s for e in evals),
        "eval_loss": evals[0].overall.loss, "eval_samples": evals[0].samples,
    }


def _train_segments(spec: dict):
    from loramix.config import load_config
    from loramix.data.prepare import prepare_data
    from loramix.model import load_tokenizer

    cfg = load_config(ROOT / "configs" / "seed.yaml", overrides(spec))
    return prepare_data(cfg.data, load_tokenizer(cfg.model), log=lambda *a: None).train


class _Rows:
    """A map-style dataset of token lists, what the seed fed the Trainer after tokenizing."""

    def __init__(self, segments):
        self.items = [s.tokens.tolist() for s in segments]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def _collator(pad_id: int, max_length: int | None):
    """Right padding to max_length (the seed) or to the batch's longest; labels masked by the attention mask."""
    import torch

    def collate(features):
        T = max_length or max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), T), dtype=torch.long)
        for b, f in enumerate(features):
            ids[b, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[b, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return collate


def _trainer(spec: dict, model, tokenizer, train_rows, max_length: int | None, out: str):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = spec["device"].startswith("cuda")
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=8,
        num_train_epochs=1, learning_rate=spec["lr"], weight_decay=0.01, warmup_steps=spec["warmup"],
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0, use_cpu=not cuda, remove_unused_columns=False,
        bf16=cuda and torch.cuda.is_bf16_supported(), fp16=cuda and not torch.cuda.is_bf16_supported(),
    )

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    times = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=_collator(tokenizer.eos_token_id, max_length),
                      callbacks=[times])
    return trainer, times


def worker_trainer(spec: dict, max_length: int | None) -> dict:
    cfg, tokenizer, data, model = load(spec)
    rows = _Rows(data.train)
    trainer, times = _trainer(spec, model, tokenizer, rows, max_length, str(Path(spec["work"]) / "trainer-out"))
    start = time.perf_counter()
    trainer.train()
    seconds = times.times[-1] - start
    peak = peak_memory_mb(spec["device"])
    per_step = 4 * 8
    docs = [min(per_step, len(rows) - k * per_step) for k in range(len(times.times))]
    val = [seg for row in data.val_rows for seg in row]
    return {
        "train_seconds": seconds, "docs": len(rows), "steps": len(times.times), "docs_per_s": len(rows) / seconds,
        "docs_per_s_median_third": thirds(times.times, docs, start),
        "real_tokens": sum(len(s.tokens) for s in data.train), "val_loss": token_loss(model, val, spec["device"]), "peak_mb": peak,
    }


def worker_trainer_eval(spec: dict) -> dict:
    from peft import PeftModel

    from loramix.model import load_base_model

    cfg, tokenizer, data, _ = load(spec)
    base = stock_activations(load_base_model(cfg.model, cfg.data.seq_len))
    model = PeftModel.from_pretrained(base, str(Path(spec["work"]) / "loramix-run" / "adapter"))
    val = [seg for row in data.val_rows for seg in row]
    trainer, _ = _trainer(spec, model, tokenizer, _Rows(data.train), 512, str(Path(spec["work"]) / "trainer-eval"))
    runs = [trainer.evaluate(eval_dataset=_Rows(val)) for _ in range(spec["eval_reps"])]
    return {
        "eval_samples_per_s": statistics.median(r["eval_samples_per_second"] for r in runs),
        "eval_loss_trainer": runs[0]["eval_loss"],  # Trainer's own average: the mean of per-batch means
        "eval_loss": token_loss(model, val, spec["device"]), "eval_samples": len(val),
    }


WORKERS = {
    "loramix": worker_loramix,
    "trainer-dynamic": lambda spec: worker_trainer(spec, None),
    "trainer-max": lambda spec: worker_trainer(spec, 512),
    "trainer-eval": worker_trainer_eval,
}


# ----------------------------------------------------------------------------- orchestration


def run_worker(name: str, spec: dict, script: str = __file__) -> dict:
    """`script --worker name` in its own process (so peak memory is its own); its JSON result."""
    out = Path(spec["work"]) / f"{name}.json"
    cmd = [sys.executable, script, "--worker", name, "--spec", json.dumps(spec), "--worker-out", str(out)]
    print(f"  running {name} ...", flush=True)
    t = time.perf_counter()
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    subprocess.run(cmd, check=True, env={**os.environ, **quiet},
                   stdout=subprocess.DEVNULL)
    print(f"  {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(out.read_text())


def environment(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if spec["device"].startswith("cuda") else None}


def table(spec: dict, res: dict) -> str:
    lx, dyn, mx, ev = res["loramix"], res["trainer-dynamic"], res["trainer-max"], res["trainer-eval"]
    lines = [
        f"model: GPT-2 architecture, {spec['layers']} layers, width {spec['width']}, {spec['heads']} heads, random init, GPT-2 vocabulary;"
        f" {lx['docs']} training documents ({spec['docs_per_source']} per source before the 15% hold-out), {lx['eval_samples']} validation documents",
        "",
        "| training (1 epoch, same documents) | docs/s | docs/s (median third) | real tokens/s | peak memory MB | val loss after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in [("Trainer, padded to 512 (seed)", mx), ("Trainer, dynamic padding", dyn), ("loramix train", lx)]:
        lines.append(f"| {name} | {r['docs_per_s']:.2f} | {r['docs_per_s_median_third']:.2f} | {r['real_tokens'] / r['train_seconds']:,.0f} |"
                     f" {r['peak_mb']:,.0f} | {r['val_loss']:.4f} |")
    lines += [
        "",
        "| ratio, loramix / baseline | docs/s (median third) | peak memory |",
        "|---|---:|---:|",
    ]
    for name, r in [("vs padded to 512", mx), ("vs dynamic padding", dyn)]:
        lines.append(f"| {name} | {lx['docs_per_s_median_third'] / r['docs_per_s_median_third']:.2f}x | {lx['peak_mb'] / r['peak_mb']:.2f}x |")
    rel = abs(lx["eval_loss"] - ev["eval_loss"]) / ev["eval_loss"]
    lines += [
        "",
        f"| evaluation (same adapter, {spec['eval_reps']} runs, median) | samples/s | token-weighted loss |",
        "|---|---:|---:|",
        f"| Trainer.evaluate(), batch 4 x 512 | {ev['eval_samples_per_s']:.2f} | {ev['eval_loss']:.6f} (Trainer's own mean of batch means: "
        f"{ev['eval_loss_trainer']:.6f}) |",
        f"| loramix eval | {lx['eval_samples_per_s']:.2f} | {lx['eval_loss']:.6f} |",
        "",
        f"eval speed-up {lx['eval_samples_per_s'] / ev['eval_samples_per_s']:.2f}x; loss difference {rel:.1e} relative;"
        f" validation loss after training: loramix {lx['val_loss']:.4f}, Trainer {mx['val_loss']:.4f} / {dyn['val_loss']:.4f}"
        " (different data order and dropout draws: run-to-run noise)",
    ]
    return "\n".join(lines)


def parse_or_work(ap: argparse.ArgumentParser, workers: dict):
    """The parsed arguments; or, in a worker process (`run_worker`'s hidden flags), run that worker, write its
    JSON and return None."""
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.worker:
        return args
    Path(args.worker_out).write_text(json.dumps(workers[args.worker](json.loads(args.spec))))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"), help="folder of <source>.jsonl files")
    ap.add_argument("--docs-per-source", type=int, default=40)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = parse_or_work(ap, WORKERS)
    if args is None:
        return

    with tempfile.TemporaryDirectory() as work:
        spec = {"data": args.data, "docs_per_source": args.docs_per_source, "layers": args.layers, "width": args.width,
                "heads": args.heads, "lr": args.lr, "warmup": args.warmup, "eval_reps": args.eval_reps, "device": args.device, "work": work}
        start = time.perf_counter()
        results = {name: run_worker(name, spec) for name in ["loramix", "trainer-eval", *METHODS[1:]]}
        spec = {k: v for k, v in spec.items() if k != "work"}
        env = environment(spec)
        text = table(spec, results)
        print(text)
        print(f"total {time.perf_counter() - start:.0f} s")
    Path(args.out).write_text(json.dumps({"spec": spec, "environment": env, "results": results}, indent=2) + "\n")
    if args.results:
        replace_section(Path(args.results), f"speed-{args.device.split(':')[0]}", env, text, args)
    print(f"wrote {args.out}")


def replace_section(path: Path, key: str, env: dict, text: str, args) -> None:
    """Keep the newest table for this device in RESULTS.md, between markers."""
    cmd = "python benchmarks/speed.py" + ("" if args.device == "cpu" else f" --device {args.device}")
    body = (f"<!-- {key} -->\nMeasured {env['date']}: {env['cpu']}, {env['cores']} cores ({env['threads']} torch threads)"
            f"{', ' + env['gpu'] if env['gpu'] else ''}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']},"
            f" peft {env['peft']}. Command: `{cmd}`.\n\n{text}\n<!-- /{key} -->")
    write_section(path, key, body)


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the text between `<!-- key -->` and `<!-- /key -->` (both in `body`), or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = old.find(f"<!-- {key} -->"), old.find(f"<!-- /{key} -->")
    new = old[:start] + body + old[end + len(f"<!-- /{key} -->"):] if start >= 0 and end >= 0 else old.rstrip() + "\n\n" + body + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
