"""The training loop: AdamW, warmup + linear decay, gradient accumulation, clipping, mixed precision,
periodic validation, checkpoints and metrics.jsonl. `train` runs the recipe as named steps: set up,
plan, open the run dir, `fit` (the loop, which returns after the last step), the final evaluation with
the forgetting check, and the run's artifacts (adapter with its model card, eval.json, run.json).

Gradient accumulation is token-exact: each micro-batch's summed NLL is divided by the number of target
tokens in the whole optimizer step, so the gradient equals that of one big batch, whatever the padding,
packing or document lengths (a per-micro-batch mean would weight short micro-batches up).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from loramix import artifacts
from loramix import checkpoint as ckpt
from loramix.card import model_card
from loramix.config import Config, config_diff
from loramix.data.packing import Batch, Batching, Step, Steps, collate, epoch_steps
from loramix.data.prepare import Prepared
from loramix.data.sampling import Steered, reweight, start_state
from loramix.errors import LoramixError
from loramix.evaluation import EvalResult, Scorer, forgetting_check, format_table
from loramix.loss import token_nll
from loramix.model import attach_lora, compile_body, count_parameters
from loramix.records import EvalRow, Fingerprints, MixRow, RunStatus, TrainRow, read_manifest, read_status, write_manifest, write_status
from loramix.runtime import Dist, Interrupted, StopOnSignal, autocast_for, init_distributed, progress_bars, resolve_device, resolve_precision
from loramix.tracking import EventLog, check_trackers, read_metrics


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
    targets: str  # what LoRA adapts
    world: int = 1

    def describe(self, cfg: Config) -> str:
        t, d = cfg.train, cfg.data
        unit = "documents" if t.batch_unit == "docs" or not d.packing else "packed rows"
        per_step = t.micro_batch * t.grad_accum * self.world
        return "\n".join([
            "plan:",
            f"  train {self.train_docs:,} documents; validation {self.val_docs:,} documents in {self.val_rows:,} rows; "
            f"sequence length {d.seq_len}, packing {'on' if d.packing else 'off'}",
            f"  batch: {per_step} {unit} per optimizer step (train.batch_unit={t.batch_unit})"
            f" = micro_batch {t.micro_batch} x grad_accum {t.grad_accum} x {self.world} process{'es' if self.world > 1 else ''}; "
            f"at most {t.micro_batch} rows per forward pass",
            f"    on average {self.docs_per_step:,.1f} documents, {self.rows_per_step:,.1f} rows, {self.tokens_per_step:,.0f} tokens "
            f"per step; rows {100 * self.fill:.1f}% real tokens",
            f"  {self.steps_per_epoch:,} optimizer steps per epoch x {t.epochs} epochs -> {self.total_steps:,} optimizer steps"
            + (f" (capped by train.max_steps={t.max_steps})" if t.max_steps else ""),
            f"  trainable parameters {self.trainable:,} of {self.total_params:,} ({100 * self.trainable / self.total_params:.2f}%); LoRA on {self.targets}",
        ])


def batching(cfg: Config, world: int = 1) -> Batching:
    d, t = cfg.data, cfg.train
    return Batching(d.packing, t.batch_unit, t.micro_batch, t.grad_accum, d.seq_len, d.pack_window, world)


@dataclass
class Schedule:
    """Which optimizer steps come next. Static mixtures: every epoch's steps, decided up front (a pure
    function of data, config and the global batch). data.mix.strategy=adaptive: one interval of
    data.mix.every steps at a time, drawn from the state's current weights (`Steered`); an epoch is as many
    steps as one pass over the pool takes."""

    epochs: list[Steps]
    steered: Steered | None
    steps_per_epoch: int
    total: int
    every: int

    def upcoming(self, state: ckpt.TrainState) -> tuple[list[int], Sequence[Step], list[int] | None]:
        """The steps from state.step to the end of its epoch (static) or of its interval (adaptive) and the
        epoch of each, with, for adaptive, the segments taken per source once the interval is done."""
        if self.steered is None:
            epoch, at = 0, state.step
            while at >= len(self.epochs[epoch]):
                epoch, at = epoch + 1, at - len(self.epochs[epoch])
            steps = self.epochs[epoch][at : at + self.total - state.step]
            return [epoch] * len(steps), steps, None
        first = state.step - state.step % self.every
        steps, taken = self.steered.steps(state.mix["weights"], state.mix["taken"], min(first + self.every, self.total) - first)
        steps = steps[state.step - first :]
        return [k // self.steps_per_epoch for k in range(state.step, state.step + len(steps))], steps, taken


def make_plan(cfg: Config, data: Prepared, model, world: int = 1) -> tuple[Plan, Schedule]:
    """The optimizer steps and their summary (for adaptive, the summary of a static first epoch). Every
    process computes the same steps and takes its share of each."""
    lengths, b, adaptive = data.train.length, batching(cfg, world), cfg.data.mix.strategy == "adaptive"
    epochs = [epoch_steps(lengths, b, cfg.train.seed, e) for e in range(1 if adaptive else cfg.train.epochs)]
    total = len(epochs[0]) * cfg.train.epochs if adaptive else sum(len(steps) for steps in epochs)
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    first = epochs[0]
    steered = Steered(data.train, len(data.mixture.sources), b, cfg.data.mix.unit, cfg.train.seed) if adaptive else None
    schedule = Schedule(epochs, steered, len(first), total, cfg.data.mix.every)
    tokens, n_rows = int(lengths[first.segments].sum()), first.n_rows
    trainable, total_params = count_parameters(model)
    plan = Plan(
        train_docs=len(data.train), val_docs=data.val_rows.n_segments, val_rows=len(data.val_rows),
        steps_per_epoch=len(first), total_steps=total, docs_per_step=len(data.train) / len(first),
        rows_per_step=n_rows / len(first), tokens_per_step=tokens / len(first),
        fill=tokens / (n_rows * cfg.data.seq_len), trainable=trainable, total_params=total_params, targets=model.loramix_targets.describe(), world=world,
    )
    return plan, schedule


@dataclass
class TrainResult:
    """What `train` made: the tuned model (in memory), the plan, the final metrics (None after a dry run)
    and the run dir."""

    model: object
    plan: Plan
    eval: EvalResult | None
    run_dir: Path | None

    @property
    def adapter(self) -> Path | None:
        """The PEFT adapter dir (with its model card, README.md)."""
        return self.run_dir / "adapter" if self.run_dir else None

    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl: every logged training and validation event."""
        return read_metrics(self.run_dir) if self.run_dir else []


def train(cfg: Config, run_dir: Path | None, dry_run: bool = False, overwrite: bool = False, log=print, progress: bool = True) -> TrainResult:
    """Run the whole recipe; with `dry_run`, stop after printing the plan (nothing is written).

    With `train.resume=auto`, an existing run dir is continued from its newest valid checkpoint.
    Under torchrun every process runs this; only rank 0 logs and writes files.
    """
    dist = init_distributed(cfg.train.device)
    log = log if dist.main else _silent
    device = resolve_device(cfg.train.device, dist)
    precision = resolve_precision(cfg.train.precision, device)
    check_trackers(cfg.track)
    inputs = artifacts.load_inputs(cfg, lambda base: attach_lora(base, cfg.lora, cfg.train.seed), device, log)
    asked, cfg, tokenizer, data, model = cfg, inputs.cfg, inputs.tokenizer, inputs.data, inputs.model
    fingerprints = Fingerprints(inputs.base_fingerprint, asked.fingerprint(dist.world))
    plan, schedule = make_plan(cfg, data, model, dist.world)
    log(plan.describe(cfg))
    log(inputs.verdict.describe())
    log(f"  device {device}, precision {precision}")
    if dry_run:
        return TrainResult(model, plan, None, None)

    resume_from = _open_run_dir(run_dir, asked, data, overwrite, dist, log)  # the run dir keeps the config as asked
    status = RunStatus(device=str(device), precision=precision, world_size=dist.world, plan=vars(plan), probe=inputs.verdict.record(),
                       environment=artifacts.environment(), base_fingerprint=fingerprints.base, config_fingerprint=fingerprints.config)

    def record(**fields) -> None:
        if dist.main:
            write_status(run_dir, replace(status, **fields))

    record(status="running")
    # PiSSA and OLoRA move part of the base into the adapter: keep its initial state to convert back.
    initial = artifacts.save_initial_adapter(model, run_dir) if cfg.lora.init in ("pissa", "olora") and dist.main else None
    loop = None
    try:
        loop = Loop.start(cfg, model, tokenizer, data, plan, device, precision, run_dir, fingerprints, dist, log, progress and dist.main)
        if resume_from is not None:
            loop.resume(resume_from)
        final = final_evaluation(loop, fit(loop, schedule))
        save_results(loop, final, initial)
    except BaseException as e:
        interrupted = isinstance(e, Interrupted)
        if loop is not None:  # the tracker runs end as interrupted or failed; a resume reopens them
            loop.metrics.close("interrupted" if interrupted else "failed")
        if interrupted:
            record(status="interrupted")
        else:
            record(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    best = ckpt.best_checkpoint(run_dir)
    record(status="finished", best_checkpoint=best and {"name": best[0], "val_loss": best[1]})
    return TrainResult(model, plan, final, run_dir)


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


@dataclass
class Loop:
    """Everything the loop reads and advances: built once by `start`, then passed to each step."""

    cfg: Config
    model: object
    data: Prepared
    plan: Plan
    device: torch.device
    autocast: Callable
    run_dir: Path
    fingerprints: Fingerprints
    dist: Dist
    log: Callable
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    metrics: EventLog
    score: Scorer
    pad_id: int
    progress: bool
    state: ckpt.TrainState
    log_nll: torch.Tensor | None = None  # summed on the device between logged rows (no sync per step)
    log_by_source: torch.Tensor | None = None  # (2, sources): NLL and targets per source, likewise
    mix_by_source: torch.Tensor | None = None  # the same since the last reweighting (data.mix.strategy=adaptive)
    started: float = 0.0  # when this process began (or resumed) training; state.elapsed is the time before

    @classmethod
    def start(cls, cfg: Config, model, tokenizer, data: Prepared, plan: Plan, device, precision: str, run_dir: Path,
              fingerprints: Fingerprints, dist: Dist, log, progress: bool) -> Loop:
        torch.manual_seed(cfg.train.seed + dist.rank)  # dropout stream, one per process
        model.to(device).train()
        if compile_body(model, cfg.train.compile, device):
            log("  torch.compile: on (the first steps include compilation)")
        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **fused)
        autocast = autocast_for(device, precision)
        score = Scorer(model, device, tokenizer.eos_token_id, cfg.eval.batch_size, autocast, dist)
        loop = cls(cfg, model, data, plan, device, autocast, run_dir, fingerprints, dist, log, params, optimizer,
                   torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                   EventLog(run_dir, cfg.track, enabled=dist.main, run_name=cfg.name, config=cfg.to_dict()), score, tokenizer.eos_token_id, progress,
                   ckpt.TrainState(eval_batch=cfg.eval.batch_size))
        loop.log_nll = torch.zeros((), dtype=torch.float64, device=device)
        loop.log_by_source = torch.zeros((2, len(data.mixture.sources)), dtype=torch.float64, device=device)
        loop.mix_by_source = torch.zeros_like(loop.log_by_source)
        if cfg.data.mix.strategy == "adaptive":
            loop.state.mix = start_state(cfg.data.mix, data.mixture.sources, data.train)
        return loop

    def resume(self, path: Path) -> None:
        self.state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scaler, self.fingerprints, self.dist.rank, self.dist.world, self.log)
        self.score.batch_size = self.state.eval_batch
        self.metrics.rewind(self.state.metrics_bytes)  # rows logged after that checkpoint are logged again
        if self.dist.main:  # rank 0 carries the saved sums for everyone
            self.log_nll.fill_(self.state.log_nll)
            self.log_by_source.copy_(torch.tensor(self.state.log_by_source, dtype=torch.float64))
            if self.state.mix:
                self.mix_by_source.copy_(torch.tensor(self.state.mix["sums"], dtype=torch.float64))
        self.log(f"resumed from {path.name} (step {self.state.step} of {self.plan.total_steps})")

    def clock(self) -> float:
        """Wall time of the run, across resumes."""
        return self.state.elapsed + time.perf_counter() - self.started


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
    if cfg.train.resume == "auto" and artifacts.kind_of(run_dir) == artifacts.RUN:
        saved_world = read_status(run_dir).world_size
        diff = config_diff(artifacts.load_run_config(run_dir), cfg, saved_world, world)
        if diff:
            raise LoramixError(f"cannot resume {run_dir}: the config differs ({'; '.join(diff)}); resume with the run's own config "
                               "(with another process count, keep micro_batch x grad_accum x processes) or pick another --run-dir")
        saved = read_manifest(run_dir)
        changed = [n for n, m in data.mixture.manifest.sources.items() if saved is None or saved.sources.get(n) != m]
        if changed:
            raise LoramixError(f"cannot resume {run_dir}: the data of {', '.join(changed)} changed since the run started; restore it or start a new run")
        found = ckpt.find_resumable(run_dir, log)
        if found is not None:
            return found
        log(f"no valid checkpoint in {run_dir}: starting it from the beginning")
    artifacts.prepare_run_dir(run_dir, overwrite or cfg.train.resume == "auto")
    artifacts.save_config(run_dir, cfg)
    write_manifest(run_dir, data.mixture.manifest)
    return None


def fit(loop: Loop, schedule: Schedule) -> EvalResult | None:
    """The loop: one optimizer step per planned step, from the resumed one to the last (an adaptive run
    reweights its mixture between intervals); returns the last validation result (None when resumed from
    the final checkpoint)."""
    state, total = loop.state, loop.plan.total_steps
    loop.started = time.perf_counter()
    bar = Progress(total, state.step, enabled=loop.progress)
    last_eval = None
    if state.mix and state.step == 0:
        _log_mix(loop)  # the starting weights
    with StopOnSignal() as stop:
        while state.step < total:
            last_eval = _run_steps(loop, schedule, bar, stop) or last_eval
    bar.close()
    return last_eval


def _run_steps(loop: Loop, schedule: Schedule, bar: Progress, stop: StopOnSignal) -> EvalResult | None:
    """The steps `schedule` has up next: train, log, reweight, validate and checkpoint as each is due."""
    tc, state, total = loop.cfg.train, loop.state, loop.plan.total_steps
    epochs, steps, taken = schedule.upcoming(state)
    last_eval = None
    for epoch, step, micro in zip(epochs, steps, _batches(loop, steps)):
        lr = lr_at(state.step, total, tc.warmup_steps, tc.lr)
        stopping = _train_step(loop, step, micro, lr, stop.signum is not None)
        if taken is not None and state.step % schedule.every == 0:
            _reweight(loop, taken)
        if state.step % tc.log_every == 0 or state.step == total:
            _log_train(loop, epoch, lr, bar)
        if state.step == total or (tc.eval_every and state.step % tc.eval_every == 0):
            last_eval = _validate(loop)
        every = loop.cfg.checkpoint.every
        if state.step == total or (every and state.step % every == 0) or stopping:
            saved = _checkpoint(loop)
        if stopping:
            signum = stop.signum or signal.SIGTERM  # another process got the signal
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint {saved} written; "
                              f"continue with the same command plus --resume --run-dir {loop.run_dir}", signum)
    return last_eval


def _train_step(loop: Loop, step: Step, micro: list[Batch], lr: float, stop: bool) -> bool:
    """Forward and backward over this process's micro-batches, one update; returns whether any process
    was asked to stop."""
    state = loop.state
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    # The step's targets, on every process (no communication), from its own segments' columns.
    n_targets = int(loop.data.train.n_targets(np.fromiter((i for mb in step for row in mb for i in row), dtype=np.int64)).sum())
    for batch in micro:
        batch = batch.to(loop.device)
        with loop.autocast():
            per_token = token_nll(loop.model, batch)
            nll = per_token.sum()
        loop.scaler.scale(nll / n_targets).backward()
        loop.log_nll += nll.detach()
        _add_by_source(loop.log_by_source, batch.target_source, per_token.detach())
        if loop.state.mix:
            _add_by_source(loop.mix_by_source, batch.target_source, per_token.detach())
    stopping = _sum_gradients(loop.params, loop.dist, stop)
    applied = _optimizer_step(loop.optimizer, loop.scaler, loop.params, loop.cfg.train.clip)
    state.step += 1
    state.val_loss = None
    state.tokens_seen += n_targets
    state.docs_seen += sum(len(row) for mb in step for row in mb)
    state.log_tokens += n_targets
    _count_nonfinite(state, applied, loop.cfg.train.nonfinite_patience, loop.run_dir)
    return stopping


class _StepBatches(torch.utils.data.Dataset):
    """Item k: this process's micro-batches of the k-th step (every world-th row, micro_batch rows at a time)."""

    def __init__(self, loop: Loop, steps: Sequence[Step]):
        self.steps, self.segments, self.pad_id = steps, loop.data.train, loop.pad_id
        self.rank, self.world, self.micro_batch = loop.dist.rank, loop.dist.world, loop.cfg.train.micro_batch

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> list[Batch]:
        mine = [row for mb in self.steps[k] for row in mb][self.rank :: self.world]
        return [collate([[self.segments[i] for i in row] for row in mine[j : j + self.micro_batch]], self.pad_id)
                for j in range(0, len(mine), self.micro_batch)]


def _batches(loop: Loop, steps: Sequence[Step]) -> torch.utils.data.DataLoader:
    """The steps' batches in order. With train.prefetch ('auto': on CUDA) a DataLoader worker process
    builds the next steps' batches while the device computes; otherwise the training process builds each
    one when it is due. On CUDA the pin-memory thread page-locks them for asynchronous copies."""
    cuda = loop.device.type == "cuda"
    prefetch = loop.cfg.train.prefetch == "on" or (loop.cfg.train.prefetch == "auto" and cuda)
    # A private generator: the DataLoader draws a worker seed when iterated, which from the global
    # generator would shift the dropout stream and break the exact resume.
    return torch.utils.data.DataLoader(_StepBatches(loop, steps), batch_size=None, num_workers=int(prefetch),
                                       pin_memory=cuda, prefetch_factor=4 if prefetch else None, generator=torch.Generator())


def _add_by_source(sums: torch.Tensor, sources: torch.Tensor, nll: torch.Tensor) -> None:
    """Add a micro-batch's NLL and target count per source into `sums` (2, sources), on the device: positions
    without a target (source -1) add zero, so no mask has to be read back."""
    has = sources >= 0
    index = sources.clamp(min=0).reshape(-1)
    sums[0].index_add_(0, index, (nll * has).reshape(-1).double())
    sums[1].index_add_(0, index, has.reshape(-1).double())


def _reweight(loop: Loop, taken: list[int]) -> None:
    """End of an adaptive interval: new weights from every process's per-source sums (the same numbers on
    each), logged as a 'mix' row."""
    sources = loop.data.mixture.sources
    nll, targets = loop.dist.all_sum(loop.mix_by_source.clone()).cpu().numpy()
    loop.state.mix = {**reweight(loop.cfg.data.mix, sources, loop.state.mix, nll, targets), "taken": taken}
    loop.mix_by_source.zero_()
    _log_mix(loop)


def _log_mix(loop: Loop) -> None:
    """A 'mix' row: the weights the next steps are drawn with, and each source's running training loss."""
    mix, sources = loop.state.mix, loop.data.mixture.sources
    loop.metrics.write(MixRow(loop.state.step, dict(zip(sources, mix["weights"])), {n: r for n, r in zip(sources, mix["running"]) if r is not None}))


def _log_train(loop: Loop, epoch: int, lr: float, bar: Progress) -> None:
    state = loop.state
    loss = float(loop.dist.all_sum(loop.log_nll.clone())) / state.log_tokens
    nll, targets = loop.dist.all_sum(loop.log_by_source.clone()).tolist()
    per_source = {name: {"train_loss": n / t, "tokens": int(t)} for name, n, t in zip(loop.data.mixture.sources, nll, targets) if t}
    tokens_per_s = state.tokens_seen / max(loop.clock(), 1e-9)
    loop.metrics.write(TrainRow(step=state.step, epoch=state.step / loop.plan.steps_per_epoch, lr=lr, train_loss=loss, docs=state.docs_seen,
                                tokens=state.tokens_seen, skipped_steps=state.skipped_steps, elapsed_s=loop.clock(), tokens_per_s=tokens_per_s,
                                per_source=per_source))
    bar.update(state.step, loss, lr, epoch, tokens_per_s, loop.log)
    loop.log_nll.zero_()
    loop.log_by_source.zero_()
    state.log_tokens = 0


def _validate(loop: Loop) -> EvalResult:
    state = loop.state
    loop.score.progress = loop.progress and progress_bars()
    result = loop.score(loop.data.val_rows, loop.data.mixture.sources)
    state.eval_batch = result.batch_size  # what fitted: later evaluations need not search again
    state.val_loss = o_loss = result.overall.loss
    loop.metrics.write(EvalRow(step=state.step, epoch=state.step / loop.plan.steps_per_epoch, val_loss=o_loss, val_ppl=result.overall.ppl,
                               val_bpt=result.overall.bpt, val_bpb=result.overall.bpb, tokens=state.tokens_seen, elapsed_s=loop.clock(),
                               samples_per_s=result.samples_per_s, eval_tokens_per_s=result.tokens_per_s,
                               per_source={n: {"val_loss": m.loss, "val_ppl": m.ppl, "val_bpb": m.bpb} for n, m in result.per_source.items()}))
    loop.log(f"step {state.step}: val loss {o_loss:.4f}, ppl {result.overall.ppl:.2f}")
    return result


def _checkpoint(loop: Loop) -> Path:
    state, dist = loop.state, loop.dist
    state.elapsed, state.metrics_bytes, state.log_nll = loop.clock(), loop.metrics.size(), float(dist.all_sum(loop.log_nll.clone()))
    state.log_by_source = dist.all_sum(loop.log_by_source.clone()).tolist()
    if state.mix:
        state.mix["sums"] = dist.all_sum(loop.mix_by_source.clone()).tolist()
    loop.started = time.perf_counter()  # state.elapsed now holds the time so far
    rng_states = dist.gather(ckpt.local_rng_state())
    path = ckpt.checkpoints_dir(loop.run_dir) / f"step-{state.step:07d}"
    if dist.main:
        path = ckpt.save_checkpoint(loop.run_dir, state, loop.model, loop.optimizer, loop.scaler, loop.fingerprints,
                                    loop.cfg.checkpoint.keep, rng_states)
    dist.barrier()
    return path


def final_evaluation(loop: Loop, last_eval: EvalResult | None) -> EvalResult:
    """The validation result of the last step (recomputed when resumed from the final checkpoint, whose
    evaluation is logged already), with the forgetting check the config asks for."""
    loop.score.progress = False
    data = loop.data
    final = last_eval or loop.score(data.val_rows, data.mixture.sources)
    final = forgetting_check(loop.score, final, data.val_rows, data.mixture.sources, loop.cfg.eval.base_compare,
                             data.forgetting_rows, data.forgetting_sources, loop.log)
    return replace(final, step=loop.state.step)


def save_results(loop: Loop, final: EvalResult, initial: Path | None = None) -> None:
    """The adapter with its model card, the final metrics and the adapter to the trackers, then eval.json
    (written last: its presence marks a finished run)."""
    if loop.dist.main:
        targets = sorted(loop.model.peft_config["default"].target_modules)
        card = model_card(loop.cfg, loop.data.mixture.manifest, final, targets, loop.plan.trainable)
        adapter = artifacts.save_adapter(loop.model, loop.run_dir, card, initial)
        loop.log(format_table(final))
        loop.metrics.finish(final, adapter)
        artifacts.save_eval(loop.run_dir, final)


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
    """tqdm (with ETA) on a terminal or in a notebook; periodic log lines with an ETA otherwise, so CI logs stay readable."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.total, self.done, self.first, self.start = total, done, done, time.perf_counter()
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True) if enabled and progress_bars() else None

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
