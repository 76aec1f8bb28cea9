"""The training loop: AdamW, warmup + linear decay, gradient accumulation, clipping, mixed precision,
periodic validation, metrics.jsonl, and the final adapter + eval.json.

Gradient accumulation is token-exact: each micro-batch's summed NLL is divided by the number of target
tokens in the whole optimizer step, so the gradient equals that of one big batch, whatever the padding,
packing or document lengths (a per-micro-batch mean would weight short micro-batches up).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.config import Config
from loramix.data.packing import Batching, Step, collate, epoch_steps
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
    train_docs: int
    val_docs: int
    val_rows: int
    steps_per_epoch: int
    total_steps: int
    docs_per_step: float
    rows_per_step: float
    tokens_per_step: float
    fill: float  # real tokens / (rows x seq_len) over the training rows
    trainable: int
    total_params: int

    def describe(self, cfg: Config) -> str:
        t, d = cfg.train, cfg.data
        unit = "documents" if t.batch_unit == "docs" or not d.packing else "packed rows"
        return "\n".join([
            "plan:",
            f"  train {self.train_docs:,} documents; validation {self.val_docs:,} documents in {self.val_rows:,} rows; "
            f"sequence length {d.seq_len}, packing {'on' if d.packing else 'off'}",
            f"  batch: {t.micro_batch * t.grad_accum} {unit} per optimizer step{' on average' if unit == 'documents' and d.packing else ''} (train.batch_unit={t.batch_unit}), "
            f"at most {t.micro_batch} rows per forward pass",
            f"    on average {self.docs_per_step:,.1f} documents, {self.rows_per_step:,.1f} rows, {self.tokens_per_step:,.0f} tokens "
            f"per step; rows {100 * self.fill:.1f}% real tokens",
            f"  {self.steps_per_epoch:,} optimizer steps per epoch x {t.epochs} epochs -> {self.total_steps:,} optimizer steps"
            + (f" (capped by train.max_steps={t.max_steps})" if t.max_steps else ""),
            f"  trainable parameters {self.trainable:,} of {self.total_params:,} ({100 * self.trainable / self.total_params:.2f}%)",
        ])


def batching(cfg: Config) -> Batching:
    d, t = cfg.data, cfg.train
    return Batching(d.packing, t.batch_unit, t.micro_batch, t.grad_accum, d.seq_len, d.pack_window)


def make_plan(cfg: Config, data: Prepared, model) -> tuple[Plan, list[list[Step]]]:
    """Every epoch's optimizer steps, decided up front (a pure function of data and config), and their summary."""
    lengths = data.train_lengths
    schedule = [epoch_steps(lengths, batching(cfg), cfg.train.seed, e) for e in range(cfg.train.epochs)]
    total = sum(len(steps) for steps in schedule)
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    first = schedule[0]
    rows = [row for step in first for mb in step for row in mb]
    tokens = int(sum(lengths[i] for row in rows for i in row))
    trainable, total_params = count_parameters(model)
    plan = Plan(
        train_docs=len(data.train), val_docs=sum(len(r) for r in data.val_rows), val_rows=len(data.val_rows),
        steps_per_epoch=len(first), total_steps=total, docs_per_step=len(data.train) / len(first),
        rows_per_step=len(rows) / len(first), tokens_per_step=tokens / len(first),
        fill=tokens / (len(rows) * cfg.data.seq_len), trainable=trainable, total_params=total_params,
    )
    return plan, schedule


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
    plan, schedule = make_plan(cfg, data, model)
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
        final = _fit(cfg, model, tokenizer, data, plan, schedule, device, precision, run_dir, log)
    except BaseException as e:
        rundir.write_json(run_dir / "run.json", {**status, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    rundir.write_json(run_dir / "run.json", {**status, "status": "finished"})
    return TrainResult(model, plan, final, run_dir)


def _fit(cfg: Config, model, tokenizer, data: Prepared, plan: Plan, schedule: list[list[Step]], device, precision, run_dir: Path, log) -> dict:
    tc = cfg.train
    torch.manual_seed(tc.seed)  # dropout stream
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    pad_id = tokenizer.eos_token_id
    token_bytes = token_byte_lengths(tokenizer)
    metrics = rundir.MetricsLog(run_dir / "metrics.jsonl")
    eval_batch = cfg.eval.batch_size

    def validate(step: int) -> dict:
        nonlocal eval_batch
        result = evaluate(model, data.val_rows, data.mixture.sources, token_bytes, device, pad_id, eval_batch, autocast)
        eval_batch = result["batch_size"]  # what fitted: later evaluations need not search again
        o = result["overall"]
        metrics.write({"event": "eval", "step": step, "epoch": step / plan.steps_per_epoch, "val_loss": o["loss"],
                       "val_ppl": o["ppl"], "val_bpt": o["bpt"], "val_bpb": o["bpb"], "tokens": tokens_seen,
                       "elapsed_s": time.perf_counter() - start, "samples_per_s": result["samples_per_s"],
                       "eval_tokens_per_s": result["tokens_per_s"]})
        log(f"step {step}: val loss {o['loss']:.4f}, ppl {o['ppl']:.2f}")
        return result

    bar = Progress(plan.total_steps)
    start = time.perf_counter()
    step, tokens_seen, last_eval = 0, 0, None
    log_nll, log_tokens = torch.zeros((), device=device), 0
    for epoch, steps in enumerate(schedule):
        for micro_rows in steps:
            if step >= plan.total_steps:
                break
            lr = lr_at(step, plan.total_steps, tc.warmup_steps, tc.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [collate([[data.train[i] for i in row] for row in rows], pad_id) for rows in micro_rows]
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
