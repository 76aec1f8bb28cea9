"""`loramix serve` under concurrent clients and many adapters, against the same requests sent one at a time.

    python benchmarks/serve.py                      # the tiny model, ~4 minutes on 2 CPU cores
    python benchmarks/serve.py --shape smollm2      # SmolLM2-135M's shape (random weights), ~8 minutes

A random-init base (GPT-2's real vocabulary) is saved as a model dir, 32 LoRA adapters of it (loramix's default
LoRA, random non-zero B, each its own) as stock PEFT adapter dirs. Two servers run in turn, each in its own
process (`--max-batch 16 --max-queue 16`, one torch thread by default): one on 2 of the adapters, one on all 32.
Clients (threads, one HTTP request at a time each) send completions, half greedy, half seeded top-k sampling,
`max_tokens` fixed (top-p is left out: a random-init model's flat distribution makes its nucleus the
whole vocabulary, a full sort per row that no trained model needs).

- over 2 adapters (the 2-adapter server): 1 client (one-at-a-time serving), 4, 16 and 64 (twice the requests,
  more than batch plus queue hold: the excess gets 429 and its client moves on); then 1 and 16 clients streaming
  (server-sent events, a chunk per token), which gives the time to first text;
- 16 clients on the 32-adapter server, the requests spread over 1, 2, 8 and 32 distinct adapters.

Each server's levels run there and back (half the requests each way: a linear drift in the machine's speed then
costs every level the same), and all of it `--repeats` times; reported are medians over the repeats of completion
tokens/s, of tokens/s relative to one client in the same repeat (and of the other ratios within a repeat), and of
the p50/p95 latency and time to first text of the answered requests; answered, 429s and failures are totals.
Prints a table, writes JSON (every repeat) and replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from speed import environment

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the", "market", "rallied", "after", "a", "long", "winter", "while", "the", "old", "captain", "told", "stories", "of", "distant",
         "harbours", "and", "bright")
SHAPES = {  # the model: a GPT-2 of `--layers/--width/--heads`, or SmolLM2-135M's Llama shape (vocabulary 49,152 < GPT-2's ids of the prompts)
    "tiny": None,
    "smollm2": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-5, "rope_theta": 100000.0},
}


def build(work: Path, spec: dict, n: int = 32) -> list[Path]:
    """A random-init base saved as a model dir, and `n` adapters of it saved as PEFT adapter dirs (a00, a01, ...)."""
    import torch
    from safetensors.torch import load_file, save_file

    from loramix.config import load_config
    from loramix.model import attach_lora, load_base_model, load_tokenizer

    base_dir = work / "base"
    shape = SHAPES[spec["shape"]]
    if shape:
        from transformers import AutoConfig

        AutoConfig.for_model(**shape).save_pretrained(base_dir)
        cfg = load_config(None, ["model.init=random", f"model.name={base_dir}"])
    else:
        cfg = load_config(None, ["model.init=random", f"model.n_layer={spec['layers']}", f"model.n_embd={spec['width']}", f"model.n_head={spec['heads']}"])
    load_base_model(cfg.model, 1024).save_pretrained(base_dir)
    load_tokenizer(load_config(None, []).model).save_pretrained(base_dir)
    cfg = load_config(None, [f"model.name={base_dir}"])
    first = work / "a00"
    attach_lora(load_base_model(cfg.model, 1024), cfg.lora, 0).save_pretrained(first)
    weights = load_file(first / "adapter_model.safetensors")
    dirs = []
    for k in range(n):  # a fresh adapter is the identity (B = 0): make each differ from the base and the others
        gen = torch.Generator().manual_seed(k)
        path = work / f"a{k:02d}"
        if k:
            shutil.copytree(first, path)
        save_file({name: torch.randn(w.shape, generator=gen) * 0.05 if "lora_B" in name else w for name, w in weights.items()},
                  path / "adapter_model.safetensors", metadata={"format": "pt"})
        dirs.append(path)
    return dirs


def requests(n: int, max_tokens: int, distinct: int, stream: bool = False) -> list[dict]:
    """n completions, request k on adapter k % distinct, prompts of 3-14 words; greedy and seeded top-k sampling in turn."""
    sampled = {"temperature": 0.8, "top_k": 50}
    streamed = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    return [{"model": f"a{k % distinct:02d}", "prompt": " ".join(WORDS[k % 7 : k % 7 + 3 + k % 12]), "max_tokens": max_tokens, "seed": k,
             **streamed, **(sampled if k % 4 >= 2 else {"temperature": 0})} for k in range(n)]


def post(url: str, body: dict) -> tuple[int, float, float | None, int]:
    """(HTTP status, seconds, seconds to the first text (streamed), completion tokens) of one completion."""
    start, first, tokens = time.perf_counter(), None, 0
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            if not body.get("stream"):
                return r.status, time.perf_counter() - start, None, json.loads(r.read())["usage"]["completion_tokens"]
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            return r.status, time.perf_counter() - start, first, tokens
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - start, None, 0
    except OSError:
        return -1, time.perf_counter() - start, None, 0


def _percentile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def send(url: str, bodies: list[dict], clients: int) -> tuple[list[tuple], float]:
    """Send `bodies` from `clients` threads, each taking the next body when its last answer came: every
    request's outcome (as `post` gives it) and the seconds it all took."""
    results, lock, todo = [], threading.Lock(), list(reversed(bodies))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            outcome = post(url, body)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def level(runs: list[tuple[list[tuple], float]], clients: int, distinct: int, streamed: bool) -> dict:
    """One level's numbers over its runs (each as `send` returns it)."""
    results, seconds = [r for rs, _ in runs for r in rs], sum(sec for _, sec in runs)
    ok = [r for r in results if r[0] == 200]
    latency, ttft = [r[1] for r in ok], [r[2] for r in ok if r[2] is not None]
    tokens = sum(r[3] for r in ok)
    return {"clients": clients, "distinct": distinct, "streamed": streamed, "requests": len(results), "answered": len(ok),
            "rejected_429": sum(r[0] == 429 for r in results),
            "failed": sum(r[0] not in (200, 429) for r in results), "seconds": seconds, "completion_tokens": tokens,
            "tokens_per_s": tokens / seconds, "p50_s": _percentile(latency, 0.5), "p95_s": _percentile(latency, 0.95),
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95)}


def there_and_back(url: str, levels: list[tuple[list[dict], int, int]]) -> list[dict]:
    """Each (bodies, clients, distinct) level run twice, in order and then in reverse, and measured over both:
    a drift in the machine's speed that is linear in time then costs every level the same."""
    runs = {k: [] for k in range(len(levels))}
    for k in [*range(len(levels)), *reversed(range(len(levels)))]:
        bodies, clients, _ = levels[k]
        runs[k].append(send(url, bodies, clients))
    return [level(runs[k], clients, distinct, bool(bodies[0].get("stream"))) for k, (bodies, clients, distinct) in enumerate(levels)]


def start_server(dirs: list[Path], spec: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loramix", "serve", *map(str, dirs), "--port", str(port), "--device", spec["device"],
           "--max-batch", str(spec["max_batch"]), "--max-queue", str(spec["max_queue"]), "--max-tokens", str(spec["max_tokens"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(spec["threads"])} if spec["threads"] else {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(cmd)}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def serving(dirs: list[Path], spec: dict):
    proc, url = start_server(dirs, spec)
    try:
        send(url, requests(16, spec["max_tokens"], 2), 16)  # warm-up: the first level after it would pay the first batches' allocations
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def summary(runs: list[list[dict]]) -> list[dict]:
    """Per level, over the repeats: medians of tokens/s, of the ratio to one client in the same repeat and of the
    latencies; the lowest and highest ratio; totals of the counts."""
    out = []
    for rows in zip(*runs):
        ratios = [r["tokens_per_s"] / run[0]["tokens_per_s"] for r, run in zip(rows, runs)]
        out.append({k: rows[0][k] for k in ("loaded", "clients", "distinct", "streamed")}
                   | {k: sum(r[k] for r in rows) for k in ("requests", "answered", "rejected_429", "failed")}
                   | {k: statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "p50_s", "p95_s")}
                   | {k: statistics.median(r[k] for r in rows) if rows[0][k] is not None else None for k in ("ttft_p50_s", "ttft_p95_s")}
                   | {"vs_one": statistics.median(ratios), "vs_one_range": [min(ratios), max(ratios)]})
    return out


def describe(spec: dict) -> str:
    model = ("SmolLM2-135M's shape (Llama, 30 layers x 576, 9 heads, 3 key-value heads, MLP 1,536, vocabulary 49,152, tied head)"
             if spec["shape"] == "smollm2" else f"GPT-2 architecture, {spec['layers']} layers, width {spec['width']}, GPT-2 vocabulary")
    return (f"model: {model}, random init; loramix's default LoRA (r=8) on every adapter, each with its own random B; max_tokens"
            f" {spec['max_tokens']}, half greedy, half seeded sampling (temperature 0.8, top_k 50); server --max-batch"
            f" {spec['max_batch']} --max-queue {spec['max_queue']}, {spec['threads'] or 'default'} torch thread(s); {spec['repeats']} repeat(s) of every level")


def _key(row: dict) -> tuple:
    return row["loaded"], row["clients"], row["distinct"], row["streamed"]


# The ratios the targets read: (numerator level, denominator level), as (loaded, clients, distinct, streamed).
RATIOS = {"streamed": ((2, 16, 2, True), (2, 1, 2, True)), "8 vs 1": ((32, 16, 8, False), (32, 16, 1, False)),
          "32 vs 1": ((32, 16, 32, False), (32, 16, 1, False)), "32 loaded vs 2": ((32, 16, 2, False), (2, 16, 2, False))}


def paired(runs: list[list[dict]]) -> dict[str, tuple[float, float, float]]:
    """Each of RATIOS within every repeat: its median, lowest and highest."""
    out = {}
    for name, (top, bottom) in RATIOS.items():
        values = [by[top]["tokens_per_s"] / by[bottom]["tokens_per_s"] for by in ({_key(r): r for r in run} for run in runs)]
        out[name] = (statistics.median(values), min(values), max(values))
    return out


def table(spec: dict, rows: list[dict], ratios: dict[str, tuple[float, float, float]]) -> str:
    lines = [describe(spec), "",
             "| adapters loaded | clients | distinct adapters | streamed | requests | answered | 429 | failed | completion tokens/s |"
             " vs one client (lowest-highest) |"
             " p50 / p95 latency s | p50 / p95 time to first text s |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        low, high = r["vs_one_range"]
        ttft = f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f}" if r["streamed"] else "-"
        lines.append(f"| {r['loaded']} | {r['clients']} | {r['distinct']} | {'yes' if r['streamed'] else 'no'} | {r['requests']} | {r['answered']} |"
                     f" {r['rejected_429']} | {r['failed']} |"
                     f" {r['tokens_per_s']:,.0f} | {r['vs_one']:.1f}x ({low:.1f}-{high:.1f}) | {r['p50_s']:.2f} / {r['p95_s']:.2f} |"
                     f" {ttft} |")
    by = {_key(r): r for r in rows}
    said = {name: f"{m:.2f}x ({low:.2f}-{high:.2f})" for name, (m, low, high) in ratios.items()}
    lines += ["", f"At 16 clients on two adapters: {by[2, 16, 2, False]['vs_one']:.1f}x the completion tokens/s of one-at-a-time serving;"
              f" streamed, against one client streaming: {said['streamed']}. 16 clients over 8 distinct adapters: {said['8 vs 1']} the"
              f" tokens/s of the same load on one adapter (32: {said['32 vs 1']}). Two adapters in use with 32 loaded: {said['32 loaded vs 2']}"
              f" the tokens/s with only those 2 loaded. Ratios are medians (lowest-highest) over the repeats of each repeat's own pair of"
              f" levels, which the machine's drift between repeats leaves alone. At 64 clients: {by[2, 64, 2, False]['answered']} admitted and"
              f" answered, {by[2, 64, 2, False]['rejected_429']} turned away with 429, {sum(r['failed'] for r in rows)} failed in all."]
    return "\n".join(lines)


def replace_section(path: Path, key: str, title: str, env: dict, command: str, text: str) -> None:
    """This benchmark's newest table in RESULTS.md, between its markers."""
    body = (f"<!-- {key} -->\n## {title}\n\nMeasured {env['date']}: {env['cpu']}, {env['cores']} cores,"
            f" nothing else running; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}."
            f" Command: `{command}`.\n\n{text}\n<!-- /{key} -->")
    old, closing = path.read_text(), f"<!-- /{key} -->"
    start, end = old.find(f"<!-- {key} -->"), old.find(closing)
    path.write_text(old[:start] + body + old[end + len(closing) :] if start >= 0 and end >= 0 else old.rstrip() + "\n\n" + body + "\n")


def repeat(dirs: list[Path], spec: dict) -> list[dict]:
    """One run of every level: the 2-adapter server's client counts, then the 32-adapter server's spreads; each
    server's levels there and back, half the requests each way."""
    half, tokens = spec["requests"] // 2, spec["max_tokens"]
    with serving(dirs[:2], spec) as url:
        rows = [{"loaded": 2, **r} for r in there_and_back(url, [(requests(half * (2 if c == 64 else 1), tokens, 2), c, 2) for c in (1, 4, 16, 64)]
                                                               + [(requests(half, tokens, 2, stream=True), c, 2) for c in (1, 16)])]
    with serving(dirs, spec) as url:
        rows += [{"loaded": len(dirs), **r} for r in there_and_back(url, [(requests(half, tokens, d), 16, d) for d in (1, 2, 8, 32)])]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="the tiny GPT-2's size")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128,
                    help="requests per level (twice as many at 64 clients); at 64 a 16-client level lasted ~1.3 s and its repeats spread ~10%%")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch threads (0: torch's default); 1 leaves the other core of 2 to the HTTP loop and the clients"
                         " (torch's default of 2 measured 10-17%% fewer tokens/s for one client, 7-22%% more at 16 on 2026-12-07;"
                         " ~35%% fewer at 16 on an earlier day)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every level, in turn; medians are reported")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/serve.json, serve-smollm2.json for --shape smollm2)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = ap.parse_args()
    spec = {k: getattr(args, k) for k in ("shape", "layers", "width", "heads", "max_tokens", "requests", "max_batch", "max_queue", "device", "threads",
                                          "repeats")}
    with tempfile.TemporaryDirectory() as work:
        dirs = build(Path(work), spec)
        runs = [repeat(dirs, spec) for _ in range(spec["repeats"])]
    env = environment(spec)
    rows, ratios = summary(runs), paired(runs)
    text = table(spec, rows, ratios)
    print(text)
    suffix = "" if args.shape == "tiny" else f"-{args.shape}"
    out = Path(args.out or ROOT / "benchmarks" / f"serve{suffix}.json")
    out.write_text(json.dumps({"spec": spec, "environment": env, "results": rows, "ratios": ratios, "repeats": runs}, indent=2) + "\n")
    if args.results:
        title = f"Serving: concurrent clients and many adapters ({'the tiny model' if args.shape == 'tiny' else 'SmolLM2-135M shape'})"
        command = " ".join(["python benchmarks/serve.py", *sys.argv[1:]])
        replace_section(Path(args.results), f"serve{suffix}-{args.device.split(':')[0]}", title, env, command, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
