"""`loramix` command line: parse arguments, call the Python API (commands.py, what `import loramix`
exposes), print its result, and turn user mistakes into one-line errors and exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loramix.errors import LoramixError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loramix", description="LoRA fine-tuning of small causal LMs on a mixture of text datasets.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA adapter (the seed recipe: -c configs/seed.yaml)")
    t.add_argument("-c", "--config", help="YAML preset, e.g. configs/demo.yaml (default: built-in defaults)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.r=16 train.epochs=1")
    t.add_argument("--run-dir", type=Path, help="run directory (default: runs/<name>, or runs/<name>-N if taken)")
    t.add_argument("--dry-run", action="store_true", help="print the plan and exit; train and write nothing")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in --run-dir")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest valid checkpoint (train.resume=auto)")

    e = sub.add_parser("eval", help="recompute a run's validation metrics from its adapter (or score a PEFT adapter dir)")
    # One positional list (the dir, then overrides): argparse cannot split two positionals around -c.
    e.add_argument("target", nargs="+", metavar="DIR [key=value ...]",
                   help="a run dir, then overrides of how it is scored (data.packing, data.cache_dir, eval.*, train.device, "
                        "train.precision, train.compile); or a stock PEFT adapter dir, then overrides of the -c preset whose data to score")
    e.add_argument("-c", "--config", help="for a PEFT adapter dir: the preset whose data to score")
    e.add_argument("--out", type=Path, help="also write the metrics as JSON to this file")

    m = sub.add_parser("merge", help="fold an adapter into its base: a plain Hugging Face model dir")
    m.add_argument("source", type=Path, help="a run dir, or a stock PEFT adapter dir")
    m.add_argument("--out", type=Path, required=True, help="the model directory to write")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights dtype of the merged model")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    _generate_args(sub.add_parser("generate", help="sample text from a run, a PEFT adapter, a model dir or a .gguf file"))

    v = sub.add_parser("serve", help="OpenAI-compatible completions over one base and several adapters, batched together")
    v.add_argument("sources", type=Path, nargs="+", help="run dirs or PEFT adapter dirs of one base (named by their dir), or one model dir or .gguf file")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    v.add_argument("--max-batch", type=int, default=32, help="most sequences generated together, whatever their adapter")
    v.add_argument("--max-queue", type=int, default=64, help="most prompts waiting for a batch slot; beyond, requests get 429")
    v.add_argument("--device", default="auto")

    r = sub.add_parser("report", help="write report.md and report.html (plots inlined) for one or more runs")
    r.add_argument("run_dirs", type=Path, nargs="+")
    r.add_argument("--out", type=Path, help="where to write (default: the first run dir)")

    c = sub.add_parser("config", help="print the resolved config, or every key with its default and doc")
    c.add_argument("-c", "--config")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.add_argument("--keys", action="store_true", help="list every key, its default and what it does")

    for s in sub.choices.values():
        s.add_argument("--debug", action="store_true", help="show tracebacks")
        s.add_argument("--quiet", action="store_true", help="print only errors and final results")
    return p


def _generate_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("source", type=Path, help="a run dir, a stock PEFT adapter dir, a (merged) model dir or a .gguf file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; its completion streams as it is generated")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line, generated as a batch ('-': stdin)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N'")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse matches positionals only before the first option: `-c P a=b --run-dir D c=d` leaves c=d over.
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides") and not hasattr(args, "target")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        (args.overrides if hasattr(args, "overrides") else args.target).extend(extra)
    try:
        return _dispatch(args)
    except LoramixError as e:
        if args.debug:
            raise
        print(f"loramix: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("loramix: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    import yaml

    from loramix.config import keys_markdown, load_config

    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    log = print if main_process and not args.quiet else (lambda *a, **k: None)
    if args.command == "config":
        if args.keys:
            print(keys_markdown())
        else:
            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
        return 0
    _quiet_libraries()
    from loramix import commands
    from loramix.runtime import finish_distributed

    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        result = commands.train(cfg, args.run_dir, dry_run=args.dry_run, overwrite=args.overwrite, resume=args.resume, log=log, progress=not args.quiet)
        if result.run_dir and main_process:
            print(f"run dir: {result.run_dir}  (loramix eval {result.run_dir})")
    elif args.command == "eval":
        _eval(args, log, main_process)
    elif args.command == "merge":
        from loramix.merging import merge

        out = merge(args.source, args.out, args.dtype, args.overwrite)
        print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    elif args.command == "generate":
        _generate(args)
    elif args.command == "serve":
        commands.serve_sources(args.sources, args.host, args.port, args.max_tokens, args.device, args.max_batch, args.max_queue, log=print)
    elif args.command == "report":
        md, page = commands.report(args.run_dirs, args.out)
        print(f"wrote {md} and {page}")
    finish_distributed()
    return 0


def _eval(args, log, main_process: bool) -> None:
    from loramix.commands import evaluate
    from loramix.evaluation import format_table
    from loramix.files import write_json

    source, overrides = Path(args.target[0]), args.target[1:]
    result = evaluate(source, args.config, overrides, log=log, progress=not args.quiet)
    if main_process:
        print(format_table(result))
        if args.out:
            write_json(args.out, result.to_dict())


def _generate(args) -> None:
    from loramix.commands import generate
    from loramix.serve.sampler import Sampling

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed, tuple(args.stop))
    sampling.check()  # before reading stdin
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if str(args.prompts_file) != "-" and not args.prompts_file.is_file():
            raise LoramixError(f"prompts file {args.prompts_file} does not exist; pass a text file with one prompt per line")
        text = sys.stdin.read() if str(args.prompts_file) == "-" else args.prompts_file.read_text(encoding="utf-8")
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise LoramixError("no prompts: the file or stdin holds no non-empty line")
    streaming = len(prompts) == 1 and not args.quiet
    out = generate(args.source, prompts, sampling, device=args.device, stream=(lambda t: print(t, end="", flush=True)) if streaming else None)
    if streaming:
        print()
    else:
        for prompt, text in zip(prompts, out.texts):
            print(f"{prompt}{text}\n---" if len(prompts) > 1 else text)
    print(f"[{out.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def _quiet_libraries() -> None:
    """Library chatter (progress bars for cached files, advisory warnings) buries loramix's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
