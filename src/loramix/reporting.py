"""`loramix report`: report.md and a self-contained report.html (plots inlined) for one run or several.

Everything comes from the run directories (config.yaml, manifest.json, run.json, metrics.jsonl,
eval.json). The document is built once as a list of blocks and rendered to both formats, so the two
always say the same thing.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from loramix.artifacts import Run, load_run
from loramix.card import markdown_table
from loramix.evaluation import METRIC_COLUMNS, Change, metric_rows
from loramix.files import replacing, write_atomic


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard-style exponential smoothing with bias correction (the first points are not dragged to 0)."""
    out, avg = [], 0.0
    for k, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**k))
    return out


def plot_curves(runs: list[Run], event: str, key: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for k, run in enumerate(runs):
        rows = [r for r in run.metrics if r["event"] == event and r.get(key) is not None]
        steps, values = [r["step"] for r in rows], [r[key] for r in rows]
        color = f"C{k}"
        label = run.name if len(runs) > 1 else key.replace("_", " ")
        if event == "train":
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=f"{label} (raw)")
            ax.plot(steps, smooth(values), color=color, linewidth=2, label=f"{label} (smoothed)")
        else:
            ax.plot(steps, values, color=color, marker="o", linewidth=2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def mixture_weights(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Each source's share of the training units over optimizer steps: an adaptive run's 'mix' rows, else the
    static mix's share (manifest.json) from the first step to the last."""
    moves = [r for r in run.metrics if r["event"] == "mix"]
    if moves:
        return {name: [(r["step"], r["weights"][name]) for r in moves] for name in moves[0]["weights"]}
    mix = run.manifest and run.manifest.mix
    last = max((r["step"] for r in run.metrics), default=0)
    if not mix or not last:
        return {}
    key = "share_docs" if mix.unit == "docs" and mix.strategy != "weights" else "share_tokens"
    return {name: [(0, getattr(m, key)), (last, getattr(m, key))] for name, m in mix.sources.items()}


def plot_sources(run: Run, path: Path) -> Path:
    """One line per source: training loss (smoothed), validation loss, and the mixture's weights, over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), dpi=120)
    panels = [("train", "train_loss", "Training loss per source (smoothed)"), ("eval", "val_loss", "Validation loss per source")]
    colors = {name: f"C{k % 10}" for k, name in enumerate(run.config.data.sources)}
    for ax, (event, key, title) in zip(axes, panels):
        rows = [r for r in run.metrics if r["event"] == event and r.get("per_source")]
        for name, color in colors.items():
            points = [(r["step"], r["per_source"][name][key]) for r in rows if name in r["per_source"]]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, smooth(list(values)) if event == "train" else values, color=color, marker=None if event == "train" else "o",
                        linewidth=2, label=name)
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title)
    for name, points in mixture_weights(run).items():
        steps, values = zip(*points)
        axes[2].step(steps, values, where="post", color=colors.get(name), linewidth=2, label=name)
    axes[2].set_ylabel("share of the training units")
    axes[2].set_title(f"Mixture weights ({run.config.data.mix.strategy})")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _f(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def blocks(runs: list[Run], images: dict[str, Path]) -> list[tuple]:
    """The report as ('h', text) / ('p', text) / ('table', header, rows) / ('img', caption, path) blocks."""
    out: list[tuple] = [("h", "loramix report: " + ", ".join(r.name for r in runs))]
    out.append(("table", ["run", "status", "steps", "train time (s)", "train tokens/s", "eval samples/s", "val loss", "val PPL", "val BPT", "val BPB"],
                [_summary_row(r) for r in runs]))
    out.append(("h", "Loss curves"))
    out.append(("img", "Training loss over optimizer steps (raw and smoothed)", images["train"]))
    out.append(("img", "Validation loss over optimizer steps", images["val"]))
    for run in runs:
        out += _run_blocks(run, len(runs) > 1)
        out.append(("img", f"{run.name}: loss per source and the mixture's weights over optimizer steps", images[f"sources/{run.name}"]))
    return out


def _summary_row(run: Run) -> list[str]:
    train_rows = [r for r in run.metrics if r["event"] == "train"]
    last = train_rows[-1] if train_rows else {}
    e = run.eval
    o = e.overall if e else None
    return [run.name, run.status.status or "?", str(last.get("step", 0)), _f(last.get("elapsed_s"), 1),
            _f(last.get("tokens_per_s"), 0), _f(e and e.samples_per_s, 1),
            _f(o and o.loss), _f(o and o.ppl, 2), _f(o and o.bpt, 3), _f(o and o.bpb, 3)]


def _change_table(changes: dict[str, Change]) -> tuple:
    return ("table", ["source", "base loss", "tuned loss", "change"],
            [[n, _f(c.base_loss), _f(c.tuned_loss), f"{c.delta:+.4f}"] for n, c in changes.items()])


def _packing(run: Run) -> str:
    """As the run trained: data.packing=auto is what the exactness probe decided (run.json)."""
    probe = run.status.probe
    packed = run.config.data.packing if run.config.data.packing != "auto" or not probe else probe["packing_exact"]
    return f"{'on' if packed else 'off'}{' (auto)' if run.config.data.packing == 'auto' else ''}"


def _run_blocks(run: Run, several: bool) -> list[tuple]:
    c = run.config
    m, lo, d, t = c.model, c.lora, c.data, c.train
    out: list[tuple] = [("h", f"Run {run.name}" if several else "Run")]
    sizes = ", ".join(f"{k}={getattr(m, k)}" for k in ("n_layer", "n_embd", "n_head") if getattr(m, k))
    out.append(("p", f"Model {m.name} ({m.init}{', ' + sizes if sizes else ''}); LoRA r={lo.r}, alpha={lo.alpha}, "
                     f"dropout={lo.dropout}, targets {', '.join(lo.targets)}; {t.epochs} epoch(s), AdamW lr {t.lr}, "
                     f"weight decay {t.weight_decay}, {t.warmup_steps} warmup steps; batch {t.micro_batch} x {t.grad_accum} "
                     f"x {run.status.world_size} process(es) in {t.batch_unit}; sequence length {d.seq_len}, "
                     f"packing {_packing(run)}; {len(d.sources)} sources, cap {d.cap}, {d.val_share:.0%} held out."))
    out.append(("table", ["source", "train", "validation", "weight"],
                [[n, str(s.train), str(s.val), str(s.weight)] for n, s in (run.manifest.sources if run.manifest else {}).items()]))
    e = run.eval
    if e:
        out.append(("table", METRIC_COLUMNS, metric_rows(e)))
    if e and e.forgetting:
        out.append(("p", "Forgetting check: the same validation rows scored by the base model (adapter disabled) and by the "
                         "tuned model. A negative change means the adapter lowered the loss."))
        out.append(_change_table(e.forgetting))
    if e and e.forgetting_sources:
        out.append(("p", "Forgetting sources (eval.forgetting_sources), never trained on: what the adapter costs outside the mixture."))
        out.append(_change_table(e.forgetting_sources.forgetting))
    env = run.status.environment
    out.append(("p", f"Hardware and versions: device {run.status.device or '?'} ({env.get('gpu') or 'CPU, ' + str(env.get('cpu_count')) + ' cores'}), "
                     f"precision {run.status.precision or '?'}; Python {env.get('python')}, torch {env.get('torch')}, "
                     f"transformers {env.get('transformers')}, peft {env.get('peft')}; {env.get('platform')}."))
    return out


def to_markdown(doc: list[tuple], base: Path) -> str:
    lines = []
    for block in doc:
        if block[0] == "h":
            lines.append(("# " if not lines else "## ") + block[1])
        elif block[0] == "p":
            lines.append(block[1])
        elif block[0] == "table":
            lines.append(markdown_table(block[1], block[2]))
        else:
            lines.append(f"![{block[1]}]({block[2].relative_to(base)})")
    return "\n\n".join(lines) + "\n"


def to_html(doc: list[tuple]) -> str:
    parts = []
    for block in doc:
        if block[0] == "h":
            parts.append(f"<h{1 if not parts else 2}>{html.escape(block[1])}</h{1 if not parts else 2}>")
        elif block[0] == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif block[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block[2].read_bytes()).decode()
            caption = html.escape(block[1])
            parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>loramix report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


def build_report(run_dirs: list[Path], out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write report.md, report.html and the PNGs into `out_dir` (default: the first run dir)."""
    runs = [load_run(p) for p in run_dirs]
    out_dir = Path(out_dir or runs[0].path)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {
        "train": plot_curves(runs, "train", "train_loss", "Training loss", out_dir / "train_loss.png"),
        "val": plot_curves(runs, "eval", "val_loss", "Validation loss", out_dir / "val_loss.png"),
        **{f"sources/{run.name}": plot_sources(run, out_dir / f"sources-{k}.png") for k, run in enumerate(runs)},
    }
    doc = blocks(runs, images)
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_atomic(md, to_markdown(doc, out_dir))
    write_atomic(page, to_html(doc))
    return md, page
