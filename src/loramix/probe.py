"""The exactness probe: loramix's two shortcuts checked on the user's own model, every time it loads one.

loramix trains and scores through `loss.token_nll`: several documents packed into one row (each must see
only itself) and the LM head run only at target positions. Whether both are exact depends on the model's
attention implementation, its masks and whatever its causal-LM head does to the logits (soft-capping,
scaling), none of which a model's name tells reliably. So before training or scoring, on the actual
model with its adapter, in its own dtype and attention implementation, on the device it will run on:

  loss     each probe document alone through `token_nll` == the model's own per-token loss (the
           cross-entropy of `model(input_ids).logits`, what `labels=` averages); a difference stops the command.
  packed   the documents packed in one row through `token_nll` == each alone; a difference means the
           model would leak attention across documents, so the run falls back to one document per row
           (`data.packing=auto`) or stops (`data.packing=true`).

A fresh LoRA adds nothing (B = 0), so its B matrices are set to small seeded values for the probe and
restored bit for bit afterwards; dropout is off, and no global random state is drawn (resumed runs stay
bit-identical). Three documents of 7, 13 and 29 tokens (the last longer than a short sliding window)
take well under a second on a 135M model.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from loramix.config import Config
from loramix.data.packing import IGNORE, Segment, collate
from loramix.errors import LoramixError
from loramix.loss import token_nll
from loramix.model import unwrap

LENGTHS = (7, 13, 29)
# fp32 rounding moves a per-token NLL by ~1e-6; a leak across documents or a missed logit transform
# moves it by 1e-2 and more. TF32 and GPU attention kernels round coarser.
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-3}


@dataclass(frozen=True)
class Verdict:
    """What the probe found: largest per-token NLL differences in nats, and how they were measured."""

    model_type: str
    loss_diff: float  # |token_nll of a document alone - the model's own loss|, largest over probe tokens
    packed_diff: float  # |token_nll packed in one row - alone|, largest over probe tokens
    tolerance: float
    documents: int
    tokens: int
    attention: str
    dtype: str
    device: str
    seconds: float
    packed_error: str | None = None  # what the packed forward raised, if it did

    @property
    def loss_exact(self) -> bool:
        return self.loss_diff <= self.tolerance

    @property
    def packing_exact(self) -> bool:
        return self.packed_diff <= self.tolerance

    def record(self) -> dict:
        """run.json's `probe` entry."""
        return {**asdict(self), "loss_exact": self.loss_exact, "packing_exact": self.packing_exact}

    def describe(self) -> str:
        def said(exact: bool, diff: float) -> str:
            return f"{diff:.1e}{'' if exact else ' NOT exact'}" if diff != float("inf") else f"failed ({self.packed_error})"

        return (f"  exactness probe: loss == the model's own {said(self.loss_exact, self.loss_diff)}, packed row == documents alone "
                f"{said(self.packing_exact, self.packed_diff)} (largest nats/token, tolerance {self.tolerance:g}); "
                f"{self.model_type}, {self.attention}, {self.dtype} on {self.device}, {self.documents} documents / {self.tokens} tokens, {self.seconds:.1f} s")


def probe(model) -> Verdict:
    """Run the probe on `model` (a transformers causal LM, with or without a PEFT adapter); its
    parameters, training mode and the global random state are as they were when it returns."""
    lm = unwrap(model)
    weight = lm.get_input_embeddings().weight
    start = time.perf_counter()
    docs = _documents(lm.config, weight.shape[0])
    with torch.no_grad(), _probing(model):
        try:
            alone = torch.cat([_nll(model, [seg], weight.device) for seg in docs])
            own = torch.cat([_own_nll(model, seg, weight.device) for seg in docs])
        except Exception as e:  # whatever a model raises, the user gets one line
            raise LoramixError(f"this {lm.config.model_type} model fails in loramix's forward ({type(e).__name__}: {e}); "
                               "use another model, or report the model's config.json") from e
        try:
            packed_diff, packed_error = float((_nll(model, docs, weight.device) - alone).abs().max()), None
        except Exception as e:  # a model that cannot take packed rows trains one document per row
            packed_diff, packed_error = float("inf"), f"{type(e).__name__}: {e}"
    return Verdict(
        model_type=lm.config.model_type,
        loss_diff=float((alone - own).abs().max()),
        packed_diff=packed_diff, packed_error=packed_error,
        tolerance=TOLERANCE.get(weight.device.type, TOLERANCE["cuda"]) * (1 if weight.dtype == torch.float32 else 20),
        documents=len(docs), tokens=sum(len(s.tokens) for s in docs), attention=lm.config._attn_implementation or "eager",
        dtype=str(weight.dtype).removeprefix("torch."), device=weight.device.type, seconds=time.perf_counter() - start,
    )


def settle_packing(cfg: Config, verdict: Verdict, log) -> Config:
    """`cfg` with data.packing decided by the verdict (auto: packed where exact).

    Raises:
        LoramixError: the loss differs from the model's own, or data.packing=true on a model whose packed
            rows are not exact.
    """
    if not verdict.loss_exact:
        raise LoramixError(f"loramix's loss on this {verdict.model_type} model differs from the model's own by up to {verdict.loss_diff:.2g} nats/token "
                           "(exactness probe), so it cannot train or score it exactly; use another model, or report the model's config.json")
    asked = cfg.data.packing
    if verdict.packing_exact:
        packing = asked is not False
    elif asked is True:
        raise LoramixError(f"packed rows are not exact on this {verdict.model_type} model ({verdict.attention} attention; {_how(verdict)}); "
                           "set data.packing=auto to train it one document per row")
    else:
        if asked == "auto":
            log(f"warning: packed rows are not exact on this {verdict.model_type} model ({_how(verdict)}): one document per row instead (data.packing=auto)")
        packing = False
    return replace(cfg, data=replace(cfg.data, packing=packing))


def _how(verdict: Verdict) -> str:
    if verdict.packed_error:
        return f"its forward fails on packed rows: {verdict.packed_error}"
    return f"a document packed with others differs from itself alone by up to {verdict.packed_diff:.2g} nats/token"


def _documents(config, vocab: int) -> list[Segment]:
    """Seeded token ids below the vocabulary size; the longest document spans a short sliding window."""
    window = getattr(config, "sliding_window", None)
    lengths = [*LENGTHS[:-1], max(LENGTHS[-1], window + 5) if window and window < 64 else LENGTHS[-1]]
    g = np.random.default_rng(0)
    return [Segment(0, g.integers(0, vocab, n).astype(np.int32)) for n in lengths]


def _nll(model, segments: list[Segment], device) -> torch.Tensor:
    """token_nll of `segments` in one row: the target positions' NLL, in order."""
    batch = collate([segments], 0).to(device)
    return token_nll(model, batch)[batch.targets != IGNORE].float()


def _own_nll(model, seg: Segment, device) -> torch.Tensor:
    """The model's own per-token loss of one document: the cross-entropy of its logits, after whatever
    soft-capping or scaling its forward applies to them (what `labels=` averages, less any auxiliary
    loss such as a router's)."""
    ids = torch.as_tensor(seg.tokens.astype(np.int64), device=device)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="none")


@contextlib.contextmanager
def _probing(model):
    """Eval mode, zero LoRA B matrices made non-zero from a private generator; all restored on exit."""
    modes = {m: m.training for m in model.modules()}
    saved = {}
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name and not p.any():
            saved[name] = p.detach().clone()
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    try:
        yield
    finally:
        params = dict(model.named_parameters())
        for name, value in saved.items():
            params[name].data.copy_(value)
        for m, training in modes.items():
            m.train(training)
