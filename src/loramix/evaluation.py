"""Validation metrics in one pass: token-weighted loss, perplexity, bits per token and per byte,
overall and per source, with throughput; and the forgetting check (base vs tuned model).

loss = sum of NLL over all target tokens / number of target tokens, so it does not depend on batch
size, padding or packing. bits per byte = total NLL in bits / UTF-8 bytes of the scored tokens, which
compares across tokenizers. Results are typed (`EvalResult`); `to_dict` gives eval.json's layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loramix.data.packing import IGNORE, Row, collate
from loramix.errors import LoramixError
from loramix.loss import token_nll
from loramix.runtime import Dist


@dataclass
class Metrics:
    loss: float  # nats per target token
    ppl: float
    bpt: float  # bits per token
    bpb: float  # bits per UTF-8 byte of the scored tokens
    tokens: int
    bytes: int

    @classmethod
    def of(cls, nll: float, tokens: int, nbytes: int) -> Metrics:
        loss = nll / tokens if tokens else float("nan")
        return cls(loss=loss, ppl=math.exp(loss) if tokens else float("nan"), bpt=loss / math.log(2),
                   bpb=nll / math.log(2) / nbytes if nbytes else float("nan"), tokens=tokens, bytes=nbytes)


@dataclass
class Scores:
    overall: Metrics
    per_source: dict[str, Metrics]

    def named(self) -> list[tuple[str, Metrics]]:
        """Every source, then 'overall': the rows of every table."""
        return [*self.per_source.items(), ("overall", self.overall)]


@dataclass
class Change:
    """One source's loss with the adapter disabled (base) and enabled (tuned); negative delta: it helps."""

    base_loss: float
    tuned_loss: float
    delta: float


@dataclass
class ForgettingSources(Scores):
    """Sources never trained on (eval.forgetting_sources), scored by the tuned and the base model."""

    base: Scores
    forgetting: dict[str, Change]


@dataclass
class EvalResult(Scores):
    samples: int
    rows: int
    seconds: float
    samples_per_s: float
    tokens_per_s: float
    batch_size: int
    step: int | None = None
    base: Scores | None = None  # eval.base_compare: the same rows with the adapter disabled
    forgetting: dict[str, Change] | None = None
    forgetting_sources: ForgettingSources | None = None
    overrides: list[str] | None = None  # `loramix eval` overrides applied to the run's config

    def to_dict(self) -> dict:
        """eval.json's layout (fields that are None are left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict) -> EvalResult:
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(raw)


def evaluate(model, rows: Sequence[Row], sources: list[str], device, pad_id: int,
             batch_size: int | None = None, autocast=contextlib.nullcontext, dist: Dist = Dist(),  # noqa: B008 (frozen: one process)
             progress: bool = False) -> EvalResult:
    """Metrics overall and per source over `rows`, plus throughput; the model's train/eval mode is restored.

    Under torchrun each process scores every world-th row and the token-weighted sums are added up
    across processes, so the result equals the one-process result exactly (up to float summation).
    Without a `batch_size`, the search starts at `first_batch_size(device)` rows (128 on a GPU) and halves
    on out-of-memory (the result's `batch_size` says what fitted, for the next call; one process only).

    Raises:
        LoramixError: out of GPU memory at an explicit batch size, or at one row.
    """
    size = batch_size or first_batch_size(device)
    while True:
        try:
            return _evaluate(model, rows[dist.rank :: dist.world], sources, device, pad_id, size, autocast, dist, progress)
        except torch.OutOfMemoryError:
            if batch_size or size == 1 or dist.world > 1:
                raise LoramixError(f"evaluation ran out of GPU memory at {size} rows per batch; set a smaller eval.batch_size") from None
        # Outside the handler: the traceback no longer holds the failed batch's tensors, so their memory is free.
        size //= 2
        torch.cuda.empty_cache()


def first_batch_size(device) -> int:
    """Where the evaluation batch-size search starts: 128 rows on a GPU (it halves on out-of-memory), 8 on a CPU."""
    return 128 if torch.device(device).type == "cuda" else 8


@torch.no_grad()
def _evaluate(model, rows: Sequence[Row], sources: list[str], device, pad_id: int, size: int, autocast,
              dist: Dist, progress: bool) -> EvalResult:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    S = len(sources)
    nll_sum = torch.zeros(S, dtype=torch.float64, device=device)
    tok_sum = torch.zeros(S, dtype=torch.int64, device=device)
    byte_sum = torch.zeros(S, dtype=torch.int64, device=device)
    samples = 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(rows), size), desc="eval", unit="batch", leave=False, disable=not progress):
        batch = collate(rows[i : i + size], pad_id).to(device)
        with autocast():
            nll = token_nll(model, batch)
        keep = batch.targets != IGNORE
        src = batch.target_source[keep]
        nll_sum.index_add_(0, src, nll[keep].double())
        tok_sum.index_add_(0, src, torch.ones_like(src))
        byte_sum.index_add_(0, src, batch.target_bytes[keep])
        samples += batch.n_docs
    # One exact all-reduce of the token-weighted sums (float64 holds the integer counts exactly).
    sums = dist.all_sum(torch.cat([nll_sum, tok_sum.double(), byte_sum.double(), torch.tensor([samples, len(rows)], dtype=torch.float64, device=device)]))
    nll_sum = sums[:S].tolist()
    tok_sum, byte_sum, (samples, n_rows) = sums[S : 2 * S].long().tolist(), sums[2 * S : 3 * S].long().tolist(), sums[3 * S :].long().tolist()
    seconds = time.perf_counter() - start
    model.train(was_training)
    return EvalResult(
        overall=Metrics.of(sum(nll_sum), sum(tok_sum), sum(byte_sum)),
        per_source={name: Metrics.of(nll_sum[i], tok_sum[i], byte_sum[i]) for i, name in enumerate(sources)},
        samples=samples, rows=n_rows, seconds=seconds, samples_per_s=samples / seconds if seconds else float("nan"),
        tokens_per_s=sum(tok_sum) / seconds if seconds else float("nan"), batch_size=size,
    )


@dataclass
class Scorer:
    """`evaluate` with the model and its settings bound; remembers the batch size that fitted."""

    model: object
    device: torch.device
    pad_id: int
    batch_size: int | None = None
    autocast: Callable = contextlib.nullcontext
    dist: Dist = Dist()
    progress: bool = False

    def __call__(self, rows: Sequence[Row], sources: list[str], adapter: bool = True) -> EvalResult:
        """Score `rows`; with `adapter=False`, the base model (the PEFT adapter disabled)."""
        with contextlib.nullcontext() if adapter else self.model.disable_adapter():
            result = evaluate(self.model, rows, sources, self.device, self.pad_id, self.batch_size,
                              self.autocast, self.dist, self.progress)
        self.batch_size = result.batch_size
        return result


def compare_with_base(tuned: Scores, base: Scores) -> dict[str, Change]:
    """Per source and overall: base vs tuned loss and the change."""
    base_of = dict(base.named())
    return {name: Change(base_of[name].loss, m.loss, m.loss - base_of[name].loss) for name, m in tuned.named()}


def forgetting_check(score: Scorer, result: EvalResult, val_rows: Sequence[Row], sources: list[str], base_compare: bool,
                     forgetting_rows: Sequence[Row], forgetting_sources: list[str], log=print) -> EvalResult:
    """`result` with the forgetting check added: eval.base_compare scores the validation rows again with
    the adapter disabled; eval.forgetting_sources scores sources never trained on with and without it."""
    if base_compare:
        base = score(val_rows, sources, adapter=False)
        base = Scores(base.overall, base.per_source)
        result = dataclasses.replace(result, base=base, forgetting=compare_with_base(result, base))
        log(format_base_table(result.forgetting))
    if forgetting_rows:
        tuned, base = score(forgetting_rows, forgetting_sources), score(forgetting_rows, forgetting_sources, adapter=False)
        base = Scores(base.overall, base.per_source)
        held = ForgettingSources(tuned.overall, tuned.per_source, base, compare_with_base(tuned, base))
        result = dataclasses.replace(result, forgetting_sources=held)
        log("forgetting sources (never trained on):\n" + format_base_table(held.forgetting))
    return result


METRIC_COLUMNS = ["source", "tokens", "loss", "PPL", "BPT", "BPB"]


def metric_rows(scores: Scores) -> list[list[str]]:
    """The cells of the metrics table, one row per source then overall: what the report and the model card print."""
    return [[name, f"{m.tokens:,}", f"{m.loss:.4f}", f"{m.ppl:.2f}", f"{m.bpt:.3f}", f"{m.bpb:.3f}"] for name, m in scores.named()]


def format_table(result: EvalResult) -> str:
    """The metrics as a fixed-width table: one row per source, then the overall row."""
    head = f"{'source':<18} {'tokens':>10} {'loss':>8} {'ppl':>9} {'bpt':>7} {'bpb':>7}"
    lines = [head, "-" * len(head)]
    for name, m in result.named():
        lines.append(f"{name:<18} {m.tokens:>10,} {m.loss:>8.4f} {m.ppl:>9.2f} {m.bpt:>7.3f} {m.bpb:>7.3f}")
    lines.append(f"{result.samples:,} samples in {result.rows:,} rows, {result.seconds:.2f} s: "
                 f"{result.samples_per_s:.1f} samples/s, {result.tokens_per_s:,.0f} tokens/s")
    return "\n".join(lines)


def format_base_table(changes: dict[str, Change]) -> str:
    """Base vs tuned validation loss per source (negative delta: the adapter helps)."""
    head = f"{'source':<18} {'base loss':>10} {'tuned loss':>10} {'delta':>8}"
    lines = [head, "-" * len(head)]
    for name, c in changes.items():
        lines.append(f"{name:<18} {c.base_loss:>10.4f} {c.tuned_loss:>10.4f} {c.delta:>+8.4f}")
    return "\n".join(lines)
