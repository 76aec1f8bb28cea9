"""Generation: sample from a model (a tuned one merged in memory, or any causal LM), streaming text.

The prompts run as one batch through the serving scheduler, so `loramix generate` and `loramix serve` share one
sampler (temperature, top-k, top-p, repetition penalty, a seeded generator per prompt), one incremental
detokenizer and the stop strings; loramix adds the length check and the tokens/s count here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loramix.errors import LoramixError
from loramix.model import context_length
from loramix.serve.sampler import Sampling
from loramix.serve.scheduler import Event, Scheduler, Sequence


def generate(model, tokenizer, prompts: list[str], s: Sampling, stream: Callable[[str], None] | None = None) -> tuple[list[str], float]:
    """Completions for `prompts` (one batch) and the generated tokens per second.

    `stream(text)` receives text as it settles (single prompt only).

    Raises:
        LoramixError: bad sampling settings, or a prompt and its new tokens beyond the model's positions.
    """
    s.check()
    ids = [tokenizer(p)["input_ids"] or [tokenizer.eos_token_id] for p in prompts]  # an empty prompt starts from EOS
    n_pos = context_length(model.config) or 1024
    longest = max(len(x) for x in ids)
    if longest + s.max_new_tokens > n_pos:
        raise LoramixError(f"prompt ({longest} tokens) + --max-new-tokens={s.max_new_tokens} exceeds the model's {n_pos} positions; shorten one")
    texts, failed = [""] * len(prompts), []

    def emit(event: Event) -> None:
        texts[event.index] += event.text
        if event.error:
            failed.append(event.error)
        elif stream is not None and event.text:
            stream(event.text)

    streaming = stream is not None and len(prompts) == 1
    seqs = [Sequence(x, None, s, emit, k, stream=streaming) for k, x in enumerate(ids)]
    scheduler = Scheduler(model, tokenizer, max_batch=len(seqs), max_queue=len(seqs), log=lambda *a: None)
    scheduler.submit(seqs)
    start = time.perf_counter()
    while not all(seq.done for seq in seqs):
        scheduler.step()
    seconds = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"generation failed: {failed[0]}")
    n_new = sum(len(seq.tokens) for seq in seqs)
    return texts, n_new / seconds if seconds else float("nan")
