"""`loramix serve` under concurrent clients, against the same requests sent one at a time.

    python benchmarks/serve.py            # ~3 minutes on 2 CPU cores

A random-init GPT-2 (GPT-2's real vocabulary) is saved as a model dir, two LoRA adapters of it (random,
non-zero B) as stock PEFT adapter dirs; `loramix serve` runs on both in its own process (`--max-batch 16
--max-queue 16`, one torch thread by default). Clients (threads, one HTTP request at a time each) send
completions spread over the two adapters, half greedy, half seeded top-k sampling, `max_tokens` fixed (top-p
is left out: a random-init model's flat distribution makes its nucleus the whole vocabulary, a full sort per
row that no trained model needs). Concurrency 1 is one-at-a-time serving; 4 and 16 send the same requests;
64 sends twice as many, more than batch plus queue hold, so the excess gets 429 (a client then moves on to
its next request). The levels run in turn `--repeats` times, so that each ratio compares runs a minute apart
on a CPU whose speed drifts (other work, its caches): reported per level are the medians over the repeats of
completion tokens/s, of tokens/s relative to concurrency 1 in the same repeat (with the lowest and highest),
and of the p50/p95 latency of the answered requests; requests answered, 429s and failures are totals. Prints a
table, writes JSON (every repeat) and replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
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
ADAPTERS = ("news", "stories")
WORDS = ("the", "market", "rallied", "after", "a", "long", "winter", "while", "the", "old", "captain", "told", "stories", "of", "distant",
         "harbours", "and", "bright")


def build(work: Path, spec: dict) -> list[Path]:
    """A random-init base saved as a model dir, and two adapters on it saved as PEFT adapter dirs."""
    import torch

    from loramix.config import load_config
    from loramix.model import attach_lora, load_base_model, load_tokenizer

    cfg = load_config(None, ["model.init=random", f"model.n_layer={spec['layers']}", f"model.n_embd={spec['width']}", f"model.n_head={spec['heads']}"])
    base_dir = work / "base"
    load_base_model(cfg.model, 1024).save_pretrained(base_dir)
    load_tokenizer(cfg.model).save_pretrained(base_dir)
    cfg = load_config(None, [f"model.name={base_dir}"])
    dirs = []
    for seed, name in enumerate(ADAPTERS):
        model = attach_lora(load_base_model(cfg.model, 1024), cfg.lora, seed)
        gen = torch.Generator().manual_seed(seed)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:  # a fresh adapter is the identity (B = 0): make the two differ from the base and each other
                p.data = torch.randn(p.shape, generator=gen) * 0.05
        model.save_pretrained(work / name)
        dirs.append(work / name)
    return dirs


def requests(n: int, max_tokens: int) -> list[dict]:
    """n completions spread over the adapters, prompts of 3-14 words; greedy and seeded top-k sampling in turn
    (each adapter gets both)."""
    sampled = {"temperature": 0.8, "top_k": 50}
    return [{"model": ADAPTERS[k % 2], "prompt": " ".join(WORDS[k % 7 : k % 7 + 3 + k % 12]), "max_tokens": max_tokens, "seed": k,
             **(sampled if k % 4 >= 2 else {"temperature": 0})} for k in range(n)]


def post(url: str, body: dict) -> tuple[int, float, int]:
    """(HTTP status, seconds, completion tokens)."""
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            tokens = json.loads(r.read())["usage"]["completion_tokens"]
            return r.status, time.perf_counter() - start, tokens
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - start, 0
    except OSError:
        return -1, time.perf_counter() - start, 0


def level(url: str, bodies: list[dict], clients: int) -> dict:
    """Send `bodies` from `clients` threads, each taking the next body when its last answer came."""
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
    seconds = time.perf_counter() - start
    ok = sorted(s for status, s, _ in results if status == 200)
    tokens = sum(n for status, _, n in results if status == 200)
    return {"clients": clients, "requests": len(bodies), "answered": len(ok), "rejected_429": sum(status == 429 for status, _, _ in results),
            "failed": sum(status not in (200, 429) for status, _, _ in results), "seconds": seconds, "completion_tokens": tokens,
            "tokens_per_s": tokens / seconds, "p50_s": statistics.median(ok) if ok else None,
            "p95_s": ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None}


def start_server(dirs: list[Path], spec: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loramix", "serve", *map(str, dirs), "--port", str(port), "--device", spec["device"],
           "--max-batch", str(spec["max_batch"]), "--max-queue", str(spec["max_queue"]), "--max-tokens", str(spec["max_tokens"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(spec["threads"])} if spec["threads"] else {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(cmd)}") from None
            time.sleep(0.5)


def summary(runs: list[list[dict]]) -> list[dict]:
    """Per level, over the repeats: medians of tokens/s, of the ratio to concurrency 1 in the same repeat and of
    the latencies; the lowest and highest ratio; totals of the counts."""
    out = []
    for rows in zip(*runs):
        ratios = [r["tokens_per_s"] / run[0]["tokens_per_s"] for r, run in zip(rows, runs)]
        out.append({"clients": rows[0]["clients"], **{k: sum(r[k] for r in rows) for k in ("requests", "answered", "rejected_429", "failed")},
                    **{k: statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "p50_s", "p95_s")},
                    "vs_one": statistics.median(ratios), "vs_one_range": [min(ratios), max(ratios)]})
    return out


def table(spec: dict, rows: list[dict]) -> str:
    about = (f"model: GPT-2 architecture, {spec['layers']} layers, width {spec['width']}, random init, GPT-2 vocabulary; 2 LoRA adapters"
             f" (loramix's default LoRA on c_attn and c_proj), requests alternating between them; max_tokens {spec['max_tokens']},"
             f" half greedy, half seeded sampling (temperature 0.8, top_k 50); server --max-batch {spec['max_batch']}"
             f" --max-queue {spec['max_queue']}, {spec['threads'] or 'default'} torch thread(s); {spec['repeats']} repeats of every level")
    lines = [about, "",
             "| concurrent clients | requests | answered | 429 | failed | completion tokens/s | vs one at a time (lowest-highest) | p50 latency s | p95 "
             "latency s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        low, high = r["vs_one_range"]
        lines.append(f"| {r['clients']} | {r['requests']} | {r['answered']} | {r['rejected_429']} | {r['failed']} | {r['tokens_per_s']:,.0f} |"
                     f" {r['vs_one']:.1f}x ({low:.1f}-{high:.1f}) | {r['p50_s']:.2f} | {r['p95_s']:.2f} |")
    by = {r["clients"]: r for r in rows}
    if 16 in by and 64 in by:
        summary = (f"At 16 clients: {by[16]['vs_one']:.1f}x the completion tokens/s of one-at-a-time serving (median of {spec['repeats']}), {by[16]['failed']}"
                   f" failed. At 64 clients: {by[64]['answered']} admitted and answered, {by[64]['rejected_429']} turned away with 429,"
                   f" {by[64]['failed']} failed.")
        lines += ["", summary]
    return "\n".join(lines)


def replace_section(path: Path, key: str, env: dict, text: str) -> None:
    """This benchmark's newest table in RESULTS.md, between its markers."""
    body = (f"<!-- {key} -->\n## Serving: concurrent clients over two adapters\n\nMeasured {env['date']}: {env['cpu']}, {env['cores']} cores,"
            f" shared with other work; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}."
            f" Command: `python benchmarks/serve.py`.\n\n{text}\n<!-- /{key} -->")
    old, closing = path.read_text(), f"<!-- /{key} -->"
    start, end = old.find(f"<!-- {key} -->"), old.find(closing)
    path.write_text(old[:start] + body + old[end + len(closing) :] if start >= 0 and end >= 0 else old.rstrip() + "\n\n" + body + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64, help="requests at concurrency 1, 4 and 16 (twice as many at 64)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch threads (0: torch's default); 1 leaves the other core of 2 to the HTTP loop and the clients"
                         " (torch's default of 2 measured ~35%% fewer tokens/s at 16 clients)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every level, in turn; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serve.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = ap.parse_args()
    spec = {k: getattr(args, k) for k in ("layers", "width", "heads", "max_tokens", "requests", "max_batch", "max_queue", "device", "threads", "repeats")}
    with tempfile.TemporaryDirectory() as work:
        proc, url = start_server(build(Path(work), spec), spec)
        try:
            level(url, requests(4, spec["max_tokens"]), 4)  # warm-up
            runs = [[level(url, requests(spec["requests"] * (2 if c == 64 else 1), spec["max_tokens"]), c) for c in (1, 4, 16, 64)]
                    for _ in range(spec["repeats"])]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    env = environment(spec)
    rows = summary(runs)
    text = table(spec, rows)
    print(text)
    Path(args.out).write_text(json.dumps({"spec": spec, "environment": env, "results": rows, "repeats": runs}, indent=2) + "\n")
    if args.results:
        replace_section(Path(args.results), f"serve-{args.device.split(':')[0]}", env, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
