"""The gathered LoRA pass's candidate kernels, timed on one thread: which one serve/lora.py runs.

    python benchmarks/lora_kernels.py        # ~3 minutes

For a batch whose tokens use k distinct adapters (round-robin, rank 8), the LoRA delta of every adapted layer of
a model, each layer its own weights (so that, as in a forward, the adapters' weights come from memory, not from
a cache that one layer's repeats keep warm), by:

- stacked: the used adapters' A and B side by side, each token keeping its own columns: ((x @ A.T) * own) @ B.T;
- BGMV: each token's own A and B gathered ((tokens, r, in) and (tokens, r, out)) for two batched matmuls, as
  Punica's and LoRAX's decode kernels do on GPUs;
- SGMV: tokens sorted by adapter, two matmuls per adapter on its segment, scattered back;
- segments: SGMV on tokens that come sorted by adapter (a prefill's rows, admitted sorted: serve/lora.py's), each
  adapter's delta added in place to its slice of the output, no gather, no scatter;
- grouped: SGMV's segments padded to the longest, as one batch of two batched matmuls (serve/lora.py's).

Over the layers of the tiny GPT-2 (2 x c_attn, attention c_proj, MLP c_proj) or SmolLM2-135M (30 x q, k, v, o,
gate, up, down), against the base layers' own matmuls: as the server runs them (`serve/packed.py`: oneDNN on packed
weights from the rows where that wins) and through MKL alone. Prints a table, writes benchmarks/lora_kernels.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from loramix.serve.packed import pack_linears

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": (2, [(128, 384), (128, 128), (512, 128)]),
          "smollm2": (30, [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)])}
RANK = 8


def _time(f, n: int) -> float:
    """Median milliseconds of one call."""
    f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _layer(fan_in: int, fan_out: int, tokens: int, k: int) -> dict:
    """One layer's weights, its input and each kernel's operands."""
    a, b = torch.randn(k, RANK, fan_in), torch.randn(k, fan_out, RANK)
    slots = torch.arange(tokens) % k
    order, counts = torch.argsort(slots, stable=True), torch.bincount(slots, minlength=k).tolist()
    m = max(counts)
    gather = torch.zeros(k, m, dtype=torch.long)
    start = 0
    for j, c in enumerate(counts):
        gather[j, :c] = order[start : start + c]
        start += c
    kept = torch.arange(m)[None] < torch.tensor(counts)[:, None]
    x = torch.randn(tokens, fan_in)
    return {"x": x, "x_sorted": x[order], "unsorted": torch.argsort(order), "w": torch.randn(fan_out, fan_in), "a": a, "b": b, "slots": slots,
            "order": order, "counts": counts,
            "a_stack": a.reshape(k * RANK, fan_in), "b_stack": b.transpose(0, 1).reshape(fan_out, k * RANK).T.contiguous(),
            "own": (torch.arange(k * RANK)[None] // RANK == slots[:, None]).float(),
            "a_t": a.transpose(1, 2).contiguous(), "b_t": b.transpose(1, 2).contiguous(),
            "gather": gather.flatten(), "keep": None if kept.all() else kept.flatten().nonzero().squeeze(1), "dest": gather[kept]}


def stacked(p):
    return ((p["x"] @ p["a_stack"].T) * p["own"]) @ p["b_stack"]


def bgmv(p):
    return torch.bmm(torch.bmm(p["x"][:, None], p["a_t"][p["slots"]]), p["b_t"][p["slots"]])[:, 0]


def sgmv(p):
    xs, parts, start = p["x"][p["order"]], [], 0
    for j, c in enumerate(p["counts"]):
        parts.append(xs[start : start + c] @ p["a"][j].T @ p["b"][j].T)
        start += c
    out = torch.empty(len(p["x"]), p["b"].shape[1])
    out[p["order"]] = torch.cat(parts)
    return out


def segments(p):
    out, start = torch.zeros(len(p["x"]), p["b"].shape[1]), 0
    for j, c in enumerate(p["counts"]):
        out[start : start + c].addmm_(p["x_sorted"][start : start + c] @ p["a"][j].T, p["b_t"][j])
        start += c
    return out  # in the sorted tokens' order


def grouped(p):
    k, fan_in = p["a"].shape[0], p["x"].shape[1]
    delta = torch.bmm(torch.bmm(p["x"][p["gather"]].view(k, -1, fan_in), p["a"].transpose(1, 2)), p["b_t"]).flatten(0, 1)
    return torch.zeros(len(p["x"]), p["b"].shape[1]).index_add_(0, p["dest"], delta if p["keep"] is None else delta[p["keep"]])


KERNELS = {"stacked": stacked, "bgmv": bgmv, "sgmv": sgmv, "segments": segments, "grouped": grouped}


def model(shape: str, tokens: int, k: int, repeats: int) -> dict[str, float]:
    """Milliseconds of the base matmuls and of each kernel over every adapted layer of one forward; the kernels agree."""
    n_layers, layers = SHAPES[shape]
    params = [_layer(i, o, tokens, k) for _ in range(n_layers) for i, o in layers]
    for f in (bgmv, sgmv, grouped, lambda p: segments(p)[p["unsorted"]]):
        torch.testing.assert_close(f(params[0]), stacked(params[0]), atol=1e-3, rtol=1e-4)
    base = torch.nn.ModuleList(torch.nn.Linear(p["w"].shape[1], p["w"].shape[0], bias=False) for p in params)
    with torch.no_grad():
        for linear, p in zip(base, params):
            linear.weight.copy_(p["w"])
    pack_linears(base)
    with torch.inference_mode():
        times = {"base": _time(lambda: [linear(p["x"]) for linear, p in zip(base, params)], repeats),
                 "base_mkl": _time(lambda: [p["x"] @ p["w"].T for p in params], repeats)}
    return times | {name: _time(lambda f=f: [f(p) for p in params], repeats) for name, f in KERNELS.items()}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for shape in SHAPES:
        for phase, tokens in (("decode", 16), ("decode", 32), ("prefill", 224), ("prefill", 512)):
            for k in (1, 2, 8, 16, 32):
                if k <= tokens:
                    rows.append({"shape": shape, "phase": phase, "tokens": tokens, "adapters": k,
                                 **model(shape, tokens, k, 15 if phase == "decode" else 5)})
    lines = ["| shape | phase | tokens | adapters in use | base matmuls ms (served) | MKL alone ms | stacked ms | BGMV ms | SGMV ms | segments ms |"
             " grouped ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['phase']} | {r['tokens']} | {r['adapters']} | {r['base']:.2f} | {r['base_mkl']:.2f} | {r['stacked']:.2f} |"
              f" {r['bgmv']:.2f} | {r['sgmv']:.2f} | {r['segments']:.2f} | {r['grouped']:.2f} |" for r in rows]
    print("\n".join(lines))
    (ROOT / "benchmarks" / "lora_kernels.json").write_text(json.dumps({"rank": RANK, "threads": 1, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
