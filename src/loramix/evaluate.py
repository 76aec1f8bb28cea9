"""Validation metrics in one pass: token-weighted loss, perplexity, bits per token and per byte,
overall and per source, with throughput.

loss = sum of NLL over all target tokens / number of target tokens, so it does not depend on batch
size, padding or packing. bits per byte = total NLL in bits / UTF-8 bytes of the scored tokens, which
compares across tokenizers.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from loramix.data.packing import IGNORE, Row, collate
from loramix.errors import LoramixError
from loramix import rundir
from loramix.export import load_run_adapter
from loramix.config import Config, ModelConfig
from loramix.model import load_adapter, token_nll
from loramix.runtime import Dist, autocast_for, compile_body, init_distributed, resolve_device, setup


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0).

    For byte-level BPE (GPT-2) every character of a vocabulary entry is one byte, so the length of the
    entry is exact even for tokens holding part of a multi-byte character; other tokenizers decode.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    byte_chars = set(ByteLevel.alphabet())  # the 256 characters byte-level BPE uses, one per byte
    special = set(tokenizer.all_special_ids)
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if i in special or i >= len(lengths):
            continue
        lengths[i] = len(token) if set(token) <= byte_chars else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def summarize(nll: float, tokens: int, nbytes: int) -> dict:
    loss = nll / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "ppl": math.exp(loss) if tokens else float("nan"),
        "bpt": loss / math.log(2),
        "bpb": nll / math.log(2) / nbytes if nbytes else float("nan"),
        "tokens": tokens,
        "bytes": nbytes,
    }


def evaluate(model, rows: list[Row], sources: list[str], token_bytes: np.ndarray, device, pad_id: int,
             batch_size: int | None = None, autocast=contextlib.nullcontext, dist: Dist = Dist(), progress: bool = False) -> dict:
    """Metrics overall and per source over `rows`, plus throughput; the model's train/eval mode is restored.

    Under torchrun each process scores every world-th row and the token-weighted sums are added up
    across processes, so the result equals the one-process result exactly (up to float summation).
    Without a `batch_size`, a GPU starts at 128 rows and halves on out-of-memory (the result's
    `batch_size` says what fitted, for the next call; one process only); a CPU uses 8.

    Raises:
        LoramixError: out of GPU memory at an explicit batch size, or at one row.
    """
    size = batch_size or (128 if torch.device(device).type == "cuda" else 8)
    while True:
        try:
            return {**_evaluate(model, rows[dist.rank :: dist.world], sources, token_bytes, device, pad_id, size, autocast, dist, progress),
                    "batch_size": size}
        except torch.OutOfMemoryError:
            if batch_size or size == 1 or dist.world > 1:
                raise LoramixError(f"evaluation ran out of GPU memory at {size} rows per batch; set a smaller eval.batch_size") from None
            size //= 2
            torch.cuda.empty_cache()


@torch.no_grad()
def _evaluate(model, rows: list[Row], sources: list[str], token_bytes: np.ndarray, device, pad_id: int, size: int, autocast,
              dist: Dist, progress: bool) -> dict:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    S = len(sources)
    nll_sum = torch.zeros(S, dtype=torch.float64, device=device)
    tok_sum = torch.zeros(S, dtype=torch.int64, device=device)
    byte_sum = torch.zeros(S, dtype=torch.int64, device=device)
    bytes_of = torch.from_numpy(token_bytes).to(device)
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
        byte_sum.index_add_(0, src, bytes_of[batch.targets[keep]])
        samples += batch.n_docs
    # One exact all-reduce of the token-weighted sums (float64 holds the integer counts exactly).
    sums = dist.all_sum(torch.cat([nll_sum, tok_sum.double(), byte_sum.double(), torch.tensor([samples, len(rows)], dtype=torch.float64, device=device)]))
    nll_sum, tok_sum, byte_sum, (samples, n_rows) = sums[:S].tolist(), sums[S : 2 * S].long().tolist(), sums[2 * S : 3 * S].long().tolist(), sums[3 * S :].long().tolist()
    seconds = time.perf_counter() - start
    model.train(was_training)
    per_source = {name: summarize(nll_sum[i], tok_sum[i], byte_sum[i]) for i, name in enumerate(sources)}
    return {
        "overall": summarize(sum(nll_sum), sum(tok_sum), sum(byte_sum)),
        "per_source": per_source,
        "samples": samples,
        "rows": n_rows,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds else float("nan"),
        "tokens_per_s": sum(tok_sum) / seconds if seconds else float("nan"),
    }


def format_table(metrics: dict) -> str:
    """The metrics as a fixed-width table: one row per source, then the overall row."""
    head = f"{'source':<18} {'tokens':>10} {'loss':>8} {'ppl':>9} {'bpt':>7} {'bpb':>7}"
    lines = [head, "-" * len(head)]
    rows = list(metrics["per_source"].items()) + [("overall", metrics["overall"])]
    for name, m in rows:
        lines.append(f"{name:<18} {m['tokens']:>10,} {m['loss']:>8.4f} {m['ppl']:>9.2f} {m['bpt']:>7.3f} {m['bpb']:>7.3f}")
    lines.append(f"{metrics['samples']:,} samples in {metrics['rows']:,} rows, {metrics['seconds']:.2f} s: "
                 f"{metrics['samples_per_s']:.1f} samples/s, {metrics['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


def compare_with_base(tuned: dict, base: dict) -> dict:
    """eval.json's `base` (adapter disabled) and `forgetting`: per source, base vs tuned loss and the change."""
    rows = {**tuned["per_source"], "overall": tuned["overall"]}
    base_rows = {**base["per_source"], "overall": base["overall"]}
    return {
        "base": {"overall": base["overall"], "per_source": base["per_source"]},
        "forgetting": {name: {"base_loss": base_rows[name]["loss"], "tuned_loss": m["loss"], "delta": m["loss"] - base_rows[name]["loss"]}
                       for name, m in rows.items()},
    }


def format_base_table(metrics: dict) -> str:
    """Base vs tuned validation loss per source (negative delta: the adapter helps)."""
    head = f"{'source':<18} {'base loss':>10} {'tuned loss':>10} {'delta':>8}"
    lines = [head, "-" * len(head)]
    for name, r in metrics["forgetting"].items():
        lines.append(f"{name:<18} {r['base_loss']:>10.4f} {r['tuned_loss']:>10.4f} {r['delta']:>+8.4f}")
    return "\n".join(lines)


def evaluate_run(source: Path, log=print, progress: bool = False, cfg: Config | None = None) -> dict:
    """Validation metrics of a run (from its saved config and adapter), or of a stock PEFT adapter dir on
    the data of `cfg` (its base is the one named in adapter_config.json).

    Raises:
        LoramixError: neither kind of dir, a PEFT adapter without a config, no adapter yet, or a base
            model that differs from the one trained.
    """
    source = Path(source)
    if (source / "config.yaml").is_file():
        cfg = rundir.load_run_config(source)
        load = lambda base: load_run_adapter(source, base)  # noqa: E731
    elif (source / "adapter_config.json").is_file():
        if cfg is None:
            raise LoramixError(f"{source} is a PEFT adapter dir: name the data to score it on, e.g. loramix eval {source} -c configs/demo.yaml")
        base_name = rundir.read_json(source / "adapter_config.json").get("base_model_name_or_path")
        cfg = replace(cfg, model=ModelConfig(name=base_name or cfg.model.name))
        load = lambda base: load_adapter(base, source)  # noqa: E731
    else:
        raise LoramixError(f"{source} is not a loramix run dir (no config.yaml) nor a PEFT adapter dir; pass the --run-dir of a `loramix train` run")
    dist = init_distributed(cfg.train)
    device, precision = resolve_device(cfg.train, dist)
    tokenizer, data, base = setup(cfg, log)
    # Merged into the base weights in memory: evaluation pays nothing for the LoRA side path.
    model = load(base).merge_and_unload().to(device)
    compile_body(model, cfg.train, device)
    return evaluate(model, data.val_rows, data.mixture.sources, token_byte_lengths(tokenizer), device,
                    tokenizer.eos_token_id, cfg.eval.batch_size, autocast_for(device, precision), dist, progress and dist.main)
