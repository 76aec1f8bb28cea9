"""The gathered LoRA pass's candidate kernels, timed on one thread: which one serve/lora.py runs in decode and prefill.

    python benchmarks/lora_kernels.py        # ~1 minute

For a batch whose tokens use k distinct adapters (round-robin, rank 8), the LoRA delta of one linear layer by:

- stacked: the used adapters' A and B side by side, each token keeping its own columns: ((x @ A.T) * own) @ B.T;
- BGMV: each token's own A and B gathered ((tokens, r, in) and (tokens, r, out)) for two batched matmuls, as
  Punica's and LoRAX's decode kernels do on GPUs;
- SGMV: tokens sorted by adapter, two matmuls per adapter on its segment, scattered back.

Summed over the layer shapes of the tiny GPT-2 (c_attn, attention c_proj, MLP c_proj) or SmolLM2-135M (q/o, k/v,
gate/up, down), against the base layers' own matmuls. Prints a table, writes benchmarks/lora_kernels.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": [(128, 384), (128, 128), (512, 128)], "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576)]}
RANK = 8


def _time(f, n: int = 100) -> float:
    for _ in range(5):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e6


def kernels(fan_in: int, fan_out: int, tokens: int, k: int) -> dict[str, float]:
    """Microseconds of each kernel (and the base matmul) for one layer; the kernels' results agree."""
    a, b = torch.randn(k, RANK, fan_in), torch.randn(k, fan_out, RANK)
    x, w, slots = torch.randn(tokens, fan_in), torch.randn(fan_out, fan_in), torch.arange(tokens) % k
    a_stack, b_stack = a.reshape(k * RANK, fan_in), b.transpose(0, 1).reshape(fan_out, k * RANK).T.contiguous()
    own = (torch.arange(k * RANK)[None] // RANK == slots[:, None]).float()
    a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
    order, counts = torch.argsort(slots, stable=True), torch.bincount(slots, minlength=k).tolist()

    def stacked():
        return ((x @ a_stack.T) * own) @ b_stack

    def bgmv():
        return torch.bmm(torch.bmm(x[:, None], a_t[slots]), b_t[slots])[:, 0]

    def sgmv():
        xs, parts, start = x[order], [], 0
        for j, c in enumerate(counts):
            parts.append(xs[start : start + c] @ a[j].T @ b[j].T)
            start += c
        out = torch.empty(tokens, fan_out)
        out[order] = torch.cat(parts)
        return out

    reference = stacked()
    for f in (bgmv, sgmv):
        torch.testing.assert_close(f(), reference, atol=1e-3, rtol=1e-4)
    return {"base": _time(lambda: x @ w.T), "stacked": _time(stacked), "bgmv": _time(bgmv), "sgmv": _time(sgmv)}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for shape, layers in SHAPES.items():
        for phase, tokens in (("decode", 16), ("decode", 32), ("prefill", 192), ("prefill", 512)):
            for k in (1, 2, 8, 16, 32):
                if k > tokens:
                    continue
                times = [kernels(i, o, tokens, k) for i, o in layers]
                rows.append({"shape": shape, "phase": phase, "tokens": tokens, "adapters": k, **{n: sum(t[n] for t in times) for n in times[0]}})
    lines = ["| shape | phase | tokens | adapters in use | base matmuls us | stacked us | BGMV us | SGMV us |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['phase']} | {r['tokens']} | {r['adapters']} | {r['base']:,.0f} | {r['stacked']:,.0f} | {r['bgmv']:,.0f} |"
              f" {r['sgmv']:,.0f} |" for r in rows]
    print("\n".join(lines))
    (ROOT / "benchmarks" / "lora_kernels.json").write_text(json.dumps({"rank": RANK, "threads": 1, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
