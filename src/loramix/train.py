"""The training loop: AdamW, warmup + linear decay, gradient accumulation, clipping, mixed precision,
periodic validation, metrics.jsonl, and the final adapter + eval.json.

Gradient accumulation is token-exact: each micro-batch's summed NLL is divided by the number of target
tokens in the whole accumulation window, so the gradient equals that of one big batch, whatever the
padding or the document lengths (a per-micro-batch mean would weight short micro-batches up).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loramix.config import Config, TrainConfig
from loramix.data.packing import Batch, Row, batches, collate
from loramix.data.prepare import Prepared
from loramix.evaluate import evaluate, format_table, token_byte_lengths
from loramix.model import attach_lora, base_fingerprint, count_parameters, token_nll
from loramix.runtime import autocast_for, resolve_device, setup
from loramix import rundir


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `peak`, then linear decay.

    Step 0 already gets peak/warmup (not 0, which would waste the first update).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class Plan:
    train_rows: int
    val_rows: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    trainable: int
    total_params: int

    def describe(self, cfg: Config) -> str:
        t = cfg.train
        return "\n".join([
            "plan:",
            f"  train rows {self.train_rows:,}, validation rows {self.val_rows:,}, sequence length {cfg.data.seq_len}",
            f"  batch: {t.micro_batch} sequences x {t.grad_accum} accumulation = {t.micro_batch * t.grad_accum} sequences per optimizer step",
            f"  {self.steps_per_epoch:,} optimizer steps per epoch x {t.epochs} epochs -> {self.total_steps:,} optimizer steps"
            + (f" (capped by train.max_steps={t.max_steps})" if t.max_steps else ""),
            f"  trainable parameters {self.trainable:,} of {self.total_params:,} ({100 * self.trainable / self.total_params:.2f}%)",
        ])


def make_plan(cfg: Config, data: Prepared, model) -> Plan:
    t = cfg.train
    micro = math.ceil(len(data.train_rows) / t.micro_batch)
    per_epoch = math.ceil(micro / t.grad_accum)
    total = per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    trainable, total_params = count_parameters(model)
    return Plan(len(data.train_rows), len(data.val_rows), micro, per_epoch, total, trainable, total_params)


def epoch_windows(n_rows: int, tc: TrainConfig, epoch: int) -> list[list[np.ndarray]]:
    """The epoch's row order (seeded by train.seed and epoch) cut into micro-batches, grouped per step."""
    order = np.random.default_rng([tc.seed, epoch]).permutation(n_rows)
    micro = [order[i : i + tc.micro_batch] for i in range(0, n_rows, tc.micro_batch)]
    return [micro[i : i + tc.grad_accum] for i in range(0, len(micro), tc.grad_accum)]


@dataclass
class TrainResult:
    model: object
    plan: Plan
    eval: dict | None
    run_dir: Path | None


def train(cfg: Config, run_dir: Path | None, dry_run: bool = False, overwrite: bool = False, log=print) -> TrainResult:
    """Run the whole recipe; with `dry_run`, stop after printing the plan (nothing is written)."""
    device, precision = resolve_device(cfg.train)
    tokenizer, data, model = setup(cfg, log)
    fingerprint = base_fingerprint(model)
    model = attach_lora(model, cfg.lora, cfg.train.seed)
    plan = make_plan(cfg, data, model)
    log(plan.describe(cfg))
    log(f"  device {device}, precision {precision}")
    if dry_run:
        return TrainResult(model, plan, None, None)

    run_dir = rundir.prepare_run_dir(run_dir, overwrite)
    rundir.save_config(run_dir, cfg)
    rundir.write_json(run_dir / "manifest.json", data.mixture.manifest)
    status = {"status": "running", "base_fingerprint": fingerprint, "device": str(device), "precision": precision,
              "plan": vars(plan), "environment": rundir.environment()}
    rundir.write_json(run_dir / "run.json", status)
    try:
        final = _fit(cfg, model, tokenizer, data, plan, device, precision, run_dir, log)
    except BaseException as e:
        rundir.write_json(run_dir / "run.json", {**status, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    rundir.write_json(run_dir / "run.json", {**status, "status": "finished"})
    return TrainResult(model, plan, final, run_dir)


def _fit(cfg: Config, model, tokenizer, data: Prepared, plan: Plan, device, precision, run_dir: Path, log) -> dict:
    tc = cfg.train
    torch.manual_seed(tc.seed)  # dropout stream
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    pad_id = tokenizer.eos_token_id
    val_batches = batches(data.val_rows, cfg.eval.batch_size, pad_id)
    token_bytes = token_byte_lengths(tokenizer)
    metrics = rundir.MetricsLog(run_dir / "metrics.jsonl")

    def validate(step: int) -> dict:
        result = evaluate(model, val_batches, data.mixture.sources, token_bytes, device, autocast)
        o = result["overall"]
        metrics.write({"event": "eval", "step": step, "epoch": step / plan.steps_per_epoch, "val_loss": o["loss"],
                       "val_ppl": o["ppl"], "val_bpt": o["bpt"], "val_bpb": o["bpb"], "tokens": tokens_seen,
                       "elapsed_s": time.perf_counter() - start, "samples_per_s": result["samples_per_s"]})
        log(f"step {step}: val loss {o['loss']:.4f}, ppl {o['ppl']:.2f}")
        return result

    bar = Progress(plan.total_steps)
    start = time.perf_counter()
    step, tokens_seen, last_eval = 0, 0, None
    log_nll, log_tokens = torch.zeros((), device=device), 0
    for epoch in range(tc.epochs):
        for window in epoch_windows(len(data.train_rows), tc, epoch):
            if step >= plan.total_steps:
                break
            lr = lr_at(step, plan.total_steps, tc.warmup_steps, tc.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [collate([data.train_rows[i] for i in idx], pad_id) for idx in window]
            n_targets = sum(b.n_targets for b in micro)
            for batch in micro:
                batch = batch.to(device)
                with autocast():
                    nll = token_nll(model, batch).sum()
                scaler.scale(nll / n_targets).backward()
                log_nll += nll.detach()
            if tc.clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_targets
            log_tokens += n_targets
            if step % tc.log_every == 0 or step == plan.total_steps:
                loss = log_nll.item() / log_tokens
                elapsed = time.perf_counter() - start
                metrics.write({"event": "train", "step": step, "epoch": step / plan.steps_per_epoch, "lr": lr,
                               "train_loss": loss, "tokens": tokens_seen, "elapsed_s": elapsed, "tokens_per_s": tokens_seen / elapsed})
                bar.update(step, loss, lr, epoch, log)
                log_nll.zero_()
                log_tokens = 0
            if tc.eval_every and step % tc.eval_every == 0 and step < plan.total_steps:
                validate(step)
    bar.close()
    final = validate(step)
    rundir.save_adapter(model, run_dir)
    log(format_table(final))
    rundir.write_json(run_dir / "eval.json", {"step": step, **final})
    return final


class Progress:
    """tqdm (with ETA) on a terminal; periodic log lines with an ETA otherwise, so CI logs stay readable."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, step: int, loss: float, lr: float, epoch: int, log) -> None:
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        else:
            eta = (time.perf_counter() - self.start) / step * (self.total - step)
            log(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} eta {eta:.0f}s")
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
