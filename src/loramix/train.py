"""The training loop: AdamW, warmup + linear decay, gradient accumulation, clipping, mixed precision,
periodic validation, metrics.jsonl, and the final adapter + eval.json.

Gradient accumulation is token-exact: each micro-batch's summed NLL is divided by the number of target
tokens in the whole optimizer step, so the gradient equals that of one big batch, whatever the padding,
packing or document lengths (a per-micro-batch mean would weight short micro-batches up).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix import checkpoint as ckpt
from loramix.config import Config, config_diff
from loramix.data.packing import Batch, Batching, Step, collate, epoch_steps, prefetch
from loramix.data.prepare import Prepared
from loramix.errors import LoramixError
from loramix.evaluate import compare_with_base, evaluate, format_base_table, format_table, token_byte_lengths
from loramix.model import attach_lora, base_fingerprint, count_parameters, token_nll
from loramix.runtime import Dist, autocast_for, compile_body, init_distributed, resolve_device, setup
from loramix.tracking import EventLog
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
    world: int = 1

    def describe(self, cfg: Config) -> str:
        t, d = cfg.train, cfg.data
        unit = "documents" if t.batch_unit == "docs" or not d.packing else "packed rows"
        per_step = t.micro_batch * t.grad_accum * self.world
        return "\n".join([
            "plan:",
            f"  train {self.train_docs:,} documents; validation {self.val_docs:,} documents in {self.val_rows:,} rows; "
            f"sequence length {d.seq_len}, packing {'on' if d.packing else 'off'}",
            f"  batch: {per_step} {unit} per optimizer step{' on average' if unit == 'documents' and d.packing else ''} (train.batch_unit={t.batch_unit})"
            f" = micro_batch {t.micro_batch} x grad_accum {t.grad_accum} x {self.world} process{'es' if self.world > 1 else ''}; "
            f"at most {t.micro_batch} rows per forward pass",
            f"    on average {self.docs_per_step:,.1f} documents, {self.rows_per_step:,.1f} rows, {self.tokens_per_step:,.0f} tokens "
            f"per step; rows {100 * self.fill:.1f}% real tokens",
            f"  {self.steps_per_epoch:,} optimizer steps per epoch x {t.epochs} epochs -> {self.total_steps:,} optimizer steps"
            + (f" (capped by train.max_steps={t.max_steps})" if t.max_steps else ""),
            f"  trainable parameters {self.trainable:,} of {self.total_params:,} ({100 * self.trainable / self.total_params:.2f}%)",
        ])


def batching(cfg: Config, world: int = 1) -> Batching:
    d, t = cfg.data, cfg.train
    return Batching(d.packing, t.batch_unit, t.micro_batch, t.grad_accum, d.seq_len, d.pack_window, world)


def make_plan(cfg: Config, data: Prepared, model, world: int = 1) -> tuple[Plan, list[list[Step]]]:
    """Every epoch's optimizer steps, decided up front (a pure function of data, config and the global
    batch), and their summary. Every process computes the same plan and takes its share of each step."""
    lengths = data.train_lengths
    schedule = [epoch_steps(lengths, batching(cfg, world), cfg.train.seed, e) for e in range(cfg.train.epochs)]
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
        fill=tokens / (len(rows) * cfg.data.seq_len), trainable=trainable, total_params=total_params, world=world,
    )
    return plan, schedule


@dataclass
class TrainResult:
    model: object
    plan: Plan
    eval: dict | None
    run_dir: Path | None


def train(cfg: Config, run_dir: Path | None, dry_run: bool = False, overwrite: bool = False, log=print, progress: bool = True) -> TrainResult:
    """Run the whole recipe; with `dry_run`, stop after printing the plan (nothing is written).

    With `train.resume=auto`, an existing run dir is continued from its newest valid checkpoint.
    Under torchrun every process runs this; only rank 0 logs and writes files.
    """
    dist = init_distributed(cfg.train)
    log = log if dist.main else _silent
    device, precision = resolve_device(cfg.train, dist)
    tokenizer, data, model = setup(cfg, log)
    fingerprints = {"base_fingerprint": base_fingerprint(model), "config_fingerprint": cfg.fingerprint(dist.world)}
    model = attach_lora(model, cfg.lora, cfg.train.seed)
    plan, schedule = make_plan(cfg, data, model, dist.world)
    log(plan.describe(cfg))
    log(f"  device {device}, precision {precision}")
    if dry_run:
        return TrainResult(model, plan, None, None)

    resume_from = _open_run_dir(run_dir, cfg, data, overwrite, dist, log)
    status = {**fingerprints, "device": str(device), "precision": precision, "world_size": dist.world,
              "plan": vars(plan), "environment": rundir.environment()}

    def record(**fields) -> None:
        if dist.main:
            rundir.write_json(run_dir / "run.json", {**status, **fields})

    record(status="running")
    try:
        final = _fit(cfg, model, tokenizer, data, plan, schedule, device, precision, run_dir, fingerprints, resume_from, dist, log,
                     progress and dist.main)
    except Interrupted:
        record(status="interrupted")
        raise
    except BaseException as e:
        record(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    best = ckpt.best_checkpoint(run_dir)
    record(status="finished", best_checkpoint=best and {"name": best[0], "val_loss": best[1]})
    return TrainResult(model, plan, final, run_dir)


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _open_run_dir(run_dir: Path, cfg: Config, data: Prepared, overwrite: bool, dist: Dist, log) -> Path | None:
    """A fresh run dir, or with train.resume=auto the checkpoint to continue from (None: start over).
    Rank 0 decides and prepares; every rank gets its answer (or its error).

    Raises:
        LoramixError: resuming a run made with another config or other data (the differences named).
    """
    found, error = None, None
    if dist.main:
        try:
            found = _resume_point(run_dir, cfg, data, overwrite, dist.world, log)
        except LoramixError as e:
            error = str(e)
    found, error = dist.broadcast((found, error))
    if error:
        raise LoramixError(error)
    return found


def _resume_point(run_dir: Path, cfg: Config, data: Prepared, overwrite: bool, world: int, log) -> Path | None:
    if cfg.train.resume == "auto" and (run_dir / "config.yaml").is_file():
        saved_world = rundir.read_json(run_dir / "run.json").get("world_size", 1) if (run_dir / "run.json").is_file() else 1
        diff = config_diff(rundir.load_run_config(run_dir), cfg, saved_world, world)
        if diff:
            raise LoramixError(f"cannot resume {run_dir}: the config differs ({'; '.join(diff)}); resume with the run's own config "
                               "(with another process count, keep micro_batch x grad_accum x processes) or pick another --run-dir")
        saved = rundir.read_json(run_dir / "manifest.json")
        changed = [n for n, m in data.mixture.manifest["sources"].items() if saved["sources"].get(n) != m]
        if changed:
            raise LoramixError(f"cannot resume {run_dir}: the data of {', '.join(changed)} changed since the run started; restore it or start a new run")
        found = ckpt.find_resumable(run_dir, log)
        if found is not None:
            return found
        log(f"no valid checkpoint in {run_dir}: starting it from the beginning")
    rundir.prepare_run_dir(run_dir, overwrite or cfg.train.resume == "auto")
    rundir.save_config(run_dir, cfg)
    rundir.write_json(run_dir / "manifest.json", data.mixture.manifest)
    return None


class Interrupted(LoramixError):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps; a second signal acts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _fit(cfg: Config, model, tokenizer, data: Prepared, plan: Plan, schedule: list[list[Step]], device, precision,
         run_dir: Path, fingerprints: dict, resume_from: Path | None, dist: Dist, log, progress: bool) -> dict:
    tc = cfg.train
    torch.manual_seed(tc.seed + dist.rank)  # dropout stream, one per process
    model.to(device).train()
    if compile_body(model, tc, device):
        log("  torch.compile: on (the first steps include compilation)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(device, precision)
    pad_id = tokenizer.eos_token_id
    token_bytes = token_byte_lengths(tokenizer)
    metrics = EventLog(run_dir, cfg.track, enabled=dist.main, run_name=cfg.name)
    targets_of = data.train_lengths - 1  # targets per segment: each step's global count needs no communication
    state = ckpt.TrainState(eval_batch=cfg.eval.batch_size)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scaler, fingerprints, dist.rank, dist.world, log)
        metrics.truncate(state.metrics_bytes)  # rows logged after that checkpoint are logged again
        log(f"resumed from {resume_from.name} (step {state.step} of {plan.total_steps})")

    def validate() -> dict:
        result = evaluate(model, data.val_rows, data.mixture.sources, token_bytes, device, pad_id, state.eval_batch, autocast, dist,
                          progress=bar.bar is not None)
        state.eval_batch = result["batch_size"]  # what fitted: later evaluations need not search again
        o = result["overall"]
        state.val_loss = o["loss"]
        metrics.write({"event": "eval", "step": state.step, "epoch": state.step / plan.steps_per_epoch, "val_loss": o["loss"],
                       "val_ppl": o["ppl"], "val_bpt": o["bpt"], "val_bpb": o["bpb"], "tokens": state.tokens_seen,
                       "elapsed_s": clock(), "samples_per_s": result["samples_per_s"], "eval_tokens_per_s": result["tokens_per_s"]})
        log(f"step {state.step}: val loss {o['loss']:.4f}, ppl {o['ppl']:.2f}")
        return result

    def checkpoint() -> Path:
        state.elapsed, state.metrics_bytes, state.log_nll = clock(), metrics.size(), float(dist.all_sum(log_nll.clone()))
        rng_states = dist.gather(ckpt.local_rng_state())
        if dist.main:
            ckpt.save_checkpoint(run_dir, state, model, optimizer, scaler, fingerprints, cfg.checkpoint.keep, rng_states)
        dist.barrier()
        return ckpt.checkpoints_dir(run_dir) / f"step-{state.step:07d}"

    started, elapsed0 = time.perf_counter(), state.elapsed
    clock = lambda: elapsed0 + time.perf_counter() - started  # noqa: E731  (wall time across resumes)
    steps = [(epoch, micro) for epoch, ep in enumerate(schedule) for micro in ep][: plan.total_steps]
    # Summed on device (no sync per step); after a resume rank 0 carries the saved sum for everyone.
    log_nll = torch.tensor(state.log_nll if dist.main else 0.0, dtype=torch.float64, device=device)
    total, last_eval = plan.total_steps, None
    bar = Progress(total, state.step, enabled=progress)

    def step_batches(step: Step) -> list[Batch]:
        """This process's micro-batches of a step: every world-th row, micro_batch rows at a time."""
        mine = [row for mb in step for row in mb][dist.rank :: dist.world]
        micro = [collate([[data.train[i] for i in row] for row in mine[k : k + tc.micro_batch]], pad_id)
                 for k in range(0, len(mine), tc.micro_batch)]
        return [b.pin_memory() for b in micro] if device.type == "cuda" else micro

    todo = steps[state.step :]
    batches = (step_batches(step) for _, step in todo)
    if device.type == "cuda":  # build the next steps' batches on a CPU thread while the GPU computes
        batches = prefetch(batches)
    with StopOnSignal() as stop:
        for (epoch, step), micro in zip(todo, batches):
            lr = lr_at(state.step, total, tc.warmup_steps, tc.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n_targets = int(sum(targets_of[i] for mb in step for row in mb for i in row))
            for batch in micro:
                batch = batch.to(device)
                with autocast():
                    nll = token_nll(model, batch).sum()
                scaler.scale(nll / n_targets).backward()
                log_nll += nll.detach()
            stopping = _sum_gradients(params, dist, stop.signum is not None)
            applied = _optimizer_step(optimizer, scaler, params, tc.clip)
            state.step += 1
            state.val_loss = None
            state.tokens_seen += n_targets
            state.docs_seen += sum(len(row) for mb in step for row in mb)
            state.log_tokens += n_targets
            _count_nonfinite(state, applied, tc.nonfinite_patience, run_dir)
            if state.step % tc.log_every == 0 or state.step == total:
                loss = float(dist.all_sum(log_nll.clone())) / state.log_tokens
                metrics.write({"event": "train", "step": state.step, "epoch": state.step / plan.steps_per_epoch, "lr": lr,
                               "train_loss": loss, "docs": state.docs_seen, "tokens": state.tokens_seen, "skipped_steps": state.skipped_steps,
                               "elapsed_s": clock(), "tokens_per_s": state.tokens_seen / max(clock(), 1e-9)})
                bar.update(state.step, loss, lr, epoch, state.tokens_seen / max(clock(), 1e-9), log)
                log_nll.zero_()
                state.log_tokens = 0
            if state.step == total or (tc.eval_every and state.step % tc.eval_every == 0):
                last_eval = validate()
            every = cfg.checkpoint.every
            if state.step == total or (every and state.step % every == 0) or stopping:
                saved = checkpoint()
            ckpt.crash_point(f"step-{state.step}")
            if stopping:
                signum = stop.signum or signal.SIGTERM  # another process got the signal
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint {saved} written; "
                                  f"continue with the same command plus --resume --run-dir {run_dir}", signum)
    bar.close()
    # Resumed from the final checkpoint: its evaluation is logged already, so recompute without logging.
    final = last_eval or evaluate(model, data.val_rows, data.mixture.sources, token_bytes, device, pad_id, state.eval_batch, autocast, dist)
    metrics.close()
    def score(rows, sources, adapter: bool) -> dict:
        with contextlib.nullcontext() if adapter else model.disable_adapter():
            return evaluate(model, rows, sources, token_bytes, device, pad_id, state.eval_batch, autocast, dist)

    if cfg.eval.base_compare:  # the forgetting check: the same rows, adapter switched off
        final = {**final, **compare_with_base(final, score(data.val_rows, data.mixture.sources, adapter=False))}
        log(format_base_table(final))
    if data.outside_rows:  # and on sources the adapter never saw
        tuned = score(data.outside_rows, data.outside, adapter=True)
        base = score(data.outside_rows, data.outside, adapter=False)
        final["outside"] = {"overall": tuned["overall"], "per_source": tuned["per_source"], **compare_with_base(tuned, base)}
        log("held-out sources (never trained on):\n" + format_base_table(final["outside"]))
    if dist.main:
        rundir.save_adapter(model, run_dir)
        log(format_table(final))
        rundir.write_json(run_dir / "eval.json", {"step": state.step, **final})
    return final


def _sum_gradients(params, dist: Dist, stop: bool) -> bool:
    """Add up the processes' gradients (each already divided by the step's global target count, so the sum
    is the one-process gradient) in one all-reduce, which also carries any process's stop request.
    Returns whether some process was asked to stop."""
    if dist.world == 1:
        return stop
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_tensor([float(stop)])])
    dist.all_sum(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
    return bool(flat[-1] > 0)


def _optimizer_step(optimizer, scaler, params, clip: float) -> bool:
    """Clip and step; False when the gradients were not finite and the update was skipped."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
    if scaler.is_enabled():  # fp16: the scaler skips non-finite steps itself and lowers its scale
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= scale
    else:
        applied = bool(torch.isfinite(norm))
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def _count_nonfinite(state: ckpt.TrainState, applied: bool, patience: int, run_dir: Path) -> None:
    if applied:
        state.bad_streak = 0
        return
    state.skipped_steps += 1
    state.bad_streak += 1
    if state.bad_streak >= patience:
        last = ckpt.latest_names(run_dir)
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise LoramixError(f"loss or gradients were not finite for {patience} steps in a row (up to step {state.step}); stopped, "
                           f"{kept}; lower train.lr or use train.precision=fp32 or bf16, then continue with --resume")


class Progress:
    """tqdm (with ETA) on a terminal; periodic log lines with an ETA otherwise, so CI logs stay readable."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.total, self.done, self.first, self.start = total, done, done, time.perf_counter()
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True) if enabled and sys.stderr.isatty() else None

    def update(self, step: int, loss: float, lr: float, epoch: int, tokens_per_s: float, log) -> None:
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        else:
            eta = (time.perf_counter() - self.start) / max(1, step - self.first) * (self.total - step)
            log(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tokens/s eta {eta:.0f}s")
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
