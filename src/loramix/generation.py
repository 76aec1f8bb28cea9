"""Generation: sample from a model (a tuned one merged in memory, or any causal LM), streaming text.

Decoding is transformers' `generate` (KV cache, temperature / top-k / top-p / repetition penalty, stop
strings); loramix adds the sampling checks, seeding, batching of prompts and the tokens/s count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loramix.errors import LoramixError
from loramix.model import context_length


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        problems = [
            (self.max_new_tokens < 1, f"--max-new-tokens={self.max_new_tokens} must be >= 1"),
            (self.temperature < 0, f"--temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k < 0, f"--top-k={self.top_k} must be >= 0 (0 disables it)"),
            (not 0 < self.top_p <= 1, f"--top-p={self.top_p} must be in (0, 1]"),
            (self.repetition_penalty <= 0, f"--repetition-penalty={self.repetition_penalty} must be > 0"),
        ]
        bad = [msg for cond, msg in problems if cond]
        if bad:
            raise LoramixError("; ".join(bad))


def generate(model, tokenizer, prompts: list[str], s: Sampling, stream=None) -> tuple[list[str], float]:
    """Completions for `prompts` (one batch, left-padded) and the generated tokens per second.

    `stream(text)` receives text as it is decoded (single prompt only).
    """
    from transformers import TextStreamer

    s.check()
    tokenizer.padding_side = "left"  # decoder-only: new tokens follow the last real token of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    n_pos = context_length(model.config) or 1024
    if enc["input_ids"].shape[1] + s.max_new_tokens > n_pos:
        raise LoramixError(f"prompt ({enc['input_ids'].shape[1]} tokens) + --max-new-tokens={s.max_new_tokens} exceeds the model's {n_pos} positions; "
                           "shorten one")
    streamer = None
    if stream is not None and len(prompts) == 1:
        class _Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                stream(text)

        streamer = _Stream(tokenizer, skip_prompt=True)
    torch.manual_seed(s.seed)
    sample = s.temperature > 0
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=s.max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id,
            **({"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p} if sample else {}),
            repetition_penalty=s.repetition_penalty, streamer=streamer,
            **({"stop_strings": list(s.stop), "tokenizer": tokenizer} if s.stop else {}),
        )
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :]
    texts = [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), s.stop) for row in new]
    n_new = int((new != tokenizer.pad_token_id).sum())
    return texts, n_new / seconds if seconds else float("nan")


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Text up to the first stop string (generate stops there, but may overshoot by part of a token)."""
    cuts = [text.index(x) for x in stop if x in text]
    return text[: min(cuts)] if cuts else text
