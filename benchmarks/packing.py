"""How much of each row is real tokens: padded to seq_len (the seed), dynamic padding, and loramix packing.

    python benchmarks/packing.py [--data ../shared/data/real] [--out benchmarks/packing.json]

Runs loramix's own data pipeline (sources -> split -> GPT-2 tokenizer -> truncation -> epoch plan) with the
seed's settings (cap 10,000 per source, 15% held out, 512 tokens, 4 x 8 per step) on local JSON Lines files,
and counts real tokens / (rows x row length) over one training epoch and over the validation rows.
A fixed-work measurement (no timing): it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from loramix.config import load_config
from loramix.data.packing import epoch_steps, pack_eval_rows
from loramix.data.prepare import prepare_data
from loramix.model import load_tokenizer
from loramix.training import batching

ROOT = Path(__file__).resolve().parents[1]


def fill_of_steps(lengths: np.ndarray, steps, seq_len: int, dynamic: bool) -> tuple[float, int]:
    """Real tokens / padded tokens, and the number of rows; `dynamic` pads each micro-batch to its longest row."""
    real = padded = rows = 0
    for step in steps:
        for mb in step:
            row_lens = [sum(int(lengths[i]) for i in row) for row in mb]
            real += sum(row_lens)
            padded += len(mb) * (max(row_lens) if dynamic else seq_len)
            rows += len(mb)
    return real / padded, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"), help="folder of <source>.jsonl files")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "packing.json"))
    args = ap.parse_args()

    base = load_config(ROOT / "configs" / "seed.yaml", ["model.init=random", f"data.local_dir={args.data}"])
    tok = load_tokenizer(base.model)
    data = prepare_data(base.data, tok, log=lambda *a: None)
    lengths = data.train.length
    seq_len = base.data.seq_len
    variants = {
        "padded to 512 (seed)": (["data.packing=false"], False),
        "dynamic padding": (["data.packing=false"], True),
        "packed, batch_unit=docs (default)": (["train.batch_unit=docs"], False),
        "packed, batch_unit=rows": (["train.batch_unit=rows"], False),
    }
    results = {}
    for name, (overrides, dynamic) in variants.items():
        cfg = load_config(ROOT / "configs" / "seed.yaml", ["model.init=random", f"data.local_dir={args.data}", *overrides])
        steps = epoch_steps(lengths, batching(cfg), cfg.train.seed, 0)
        fill, rows = fill_of_steps(lengths, steps, seq_len, dynamic)
        results[name] = {"train_fill": fill, "train_rows": rows, "steps": len(steps)}
    val_segments = data.val_rows.segments
    for packing in (False, True):
        rows = pack_eval_rows(val_segments, seq_len, packing)
        real = sum(len(s.tokens) for s in val_segments)
        results["packed, batch_unit=docs (default)" if packing else "padded to 512 (seed)"]["val_fill"] = real / (len(rows) * seq_len)
        results["packed, batch_unit=docs (default)" if packing else "padded to 512 (seed)"]["val_rows"] = len(rows)

    print(f"{len(lengths):,} training documents, {int(lengths.sum()):,} tokens (mean {lengths.mean():.0f}), rows of {seq_len}")
    print(f"{'layout':<36} {'train fill':>10} {'rows/epoch':>11} {'steps':>6} {'val fill':>9} {'val rows':>9}")
    for name, r in results.items():
        val = f"{100 * r['val_fill']:>8.1f}% {r['val_rows']:>9,}" if "val_fill" in r else f"{'':>9} {'':>9}"
        print(f"{name:<36} {100 * r['train_fill']:>9.1f}% {r['train_rows']:>11,} {r['steps']:>6,} {val}")
    Path(args.out).write_text(json.dumps({"data": args.data, "seq_len": seq_len, "train_docs": len(lengths),
                                          "train_tokens": int(lengths.sum()), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
