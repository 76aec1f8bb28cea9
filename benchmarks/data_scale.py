"""Preparing a large mixture on one machine: time, tokens/s and peak memory of `loramix train --dry-run` as the corpus grows.

    python benchmarks/data_scale.py                       # 80k, 320k and 1M documents; about an hour on 2 cores
    python benchmarks/data_scale.py --docs 20000 --out /tmp/d.json --results ''   # one size, a minute or two

Documents in the eight datasets' schemas, made from the real samples in ../shared/data/real (written to a temporary
folder at run time, never into the project): every row is used over and over with a distinct number in its text
field, so no two documents are equal and the token cache cannot share work. Each size runs
`loramix train -c configs/seed.yaml model.init=random data.local_dir=DIR data.cap=N/8 --dry-run` in a fresh
process with a fresh cache (so it tokenizes everything) and reports wall time, tokens prepared, tokens/s, the
process's peak RSS and its peak anonymous memory (RSS less the pages of memory-mapped files); then again with the
cache warm. Writes JSON and replaces the `data-scale` section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["wikitext", "tinystories", "ag_news", "yelp_review_full", "cnn_dailymail", "xsum", "squad", "imdb"]
TEXT_FIELD = {"wikitext": "text", "tinystories": "text", "ag_news": "text", "yelp_review_full": "text", "cnn_dailymail": "article",
              "xsum": "document", "squad": "context", "imdb": "text"}


def make_corpus(real: Path, per_source: int, out: Path) -> None:
    """<source>.jsonl with `per_source` distinct rows each (real rows reused, numbered), plus 15% for the hold-out."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        rows = [json.loads(line) for line in (real / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
        rows = [r for r in rows if str(r.get(TEXT_FIELD[name], "")).strip()]
        field = TEXT_FIELD[name]
        with (out / f"{name}.jsonl").open("w") as fh:
            for k in range(per_source):
                row = dict(rows[k % len(rows)])
                row[field] = f"{row[field]} ({k})"
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def measure(data: Path, cache: Path, per_source: int) -> dict:
    """One `--dry-run` in its own process: wall seconds, the plan's token count, peak RSS."""
    cmd = [sys.executable, "-c", _WATCHED,
           "train", "-c", str(ROOT / "configs" / "seed.yaml"), "model.init=random", f"data.local_dir={data}", f"data.cap={per_source}",
           f"data.cache_dir={cache}", "--dry-run"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    out = proc.stdout
    peak_mb, anon_mb = (int(out.split(key)[1].split()[0]) / 1024 for key in ("PEAK_KB", "PEAK_ANON_KB"))
    tokens = sum(int(line.split("tokenized, ")[1].split(" tokens")[0].replace(",", "")) for line in out.splitlines() if "tokenized, " in line)
    return {"wall_s": wall, "peak_mb": peak_mb, "peak_anon_mb": anon_mb, "tokens": tokens, "tokens_per_s": tokens / wall if tokens else None}


# The command in a process that reports its peak RSS (ru_maxrss) and its peak anonymous memory, sampled every
# 20 ms: RSS also counts the pages of the memory-mapped files it read (datasets' Arrow cache of the source being
# read), which the kernel can drop at any time; anonymous memory is what the process itself holds.
_WATCHED = """
import resource, sys, threading, time
from loramix.cli import main
anon = [0]
def watch():
    while True:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                anon[0] = max(anon[0], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
rc = main(sys.argv[1:])
print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'PEAK_ANON_KB', anon[0])
sys.exit(rc)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--docs", type=int, nargs="+", default=[80_000, 320_000, 1_000_000], help="documents in all, before the 15%% hold-out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "data_scale.json"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="markdown file whose section to replace ('' for none)")
    args = ap.parse_args()

    from speed import write_section

    results = []
    for n in args.docs:
        per_source = n // len(SOURCES)
        with tempfile.TemporaryDirectory() as tmp:
            data, cache = Path(tmp) / "data", Path(tmp) / "cache"
            make_corpus(Path(args.real), per_source, data)
            cold = measure(data, cache, per_source)
            warm = measure(data, cache, per_source)
        row = {"docs": per_source * len(SOURCES), "cold": cold, "warm": warm}
        results.append(row)
        print(f"{row['docs']:>9,} docs: cold {cold['wall_s']:7.1f} s, {cold['tokens']:>12,} tokens, {cold['tokens_per_s'] or 0:>9,.0f} tokens/s, "
              f"peak {cold['peak_mb']:7,.0f} MB ({cold['peak_anon_mb']:,.0f} anonymous); warm {warm['wall_s']:6.1f} s, peak {warm['peak_mb']:7,.0f} MB",
              flush=True)
    lines = ["| documents | tokens | cold: wall (s) | tokens/s | peak RSS MB | peak anonymous MB | warm cache: wall (s) | peak RSS MB | peak anonymous MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['docs']:,} | {r['cold']['tokens']:,} | {r['cold']['wall_s']:.1f} | {r['cold']['tokens_per_s'] or 0:,.0f} | {r['cold']['peak_mb']:,.0f} "
              f"| {r['cold']['peak_anon_mb']:,.0f} | {r['warm']['wall_s']:.1f} | {r['warm']['peak_mb']:,.0f} | {r['warm']['peak_anon_mb']:,.0f} |"
              for r in results]
    text = "\n".join(lines)
    print(text)
    env = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "load_1min_end": os.getloadavg()[0]}
    Path(args.out).write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    if args.results:
        command = " ".join(["python", "benchmarks/data_scale.py", *sys.argv[1:]])
        write_section(Path(args.results), "data-scale", f"<!-- data-scale -->\n## Preparing a large mixture\n\nMeasured {env['date']}, {env['cores']} cores, "
                      f"1-minute load {env['load_1min_end']:.2f} at the end. Command: `{command}`.\n\n{text}\n<!-- /data-scale -->")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
