"""Incremental detokenizing: a sequence's text as its tokens come, and how much of it is final.

Shared by `loramix serve` and `loramix generate` (both run through the scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Detokenizer:
    """One sequence's text so far, decoding its newest tokens only, as transformers' streamers and vLLM do:
    decoding all of them each step costs a row O(length) a step (16 rows of 1,000 tokens: ~1 ms). The tokens
    decoded just before them come along and their text is taken off, since a token's text may depend on the
    one before (a SentencePiece word's leading space); the text settles once it ends in a whole character."""

    tokenizer: object
    text: str = ""  # the text of tokens[:read_at]
    prefix_at: int = 0
    read_at: int = 0

    def update(self, tokens: list[int]) -> str:
        """The whole text of `tokens` (the last call's and more), its last characters perhaps still to change."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        before, now = decode(tokens[self.prefix_at : self.read_at]), decode(tokens[self.prefix_at :])
        new = now[len(before) :]
        if new and not new.endswith("\ufffd"):
            self.text, self.prefix_at, self.read_at, new = self.text + new, self.read_at, len(tokens), ""
        return self.text + new


def settled(text: str, stop: tuple[str, ...]) -> int:
    """How much of `text` cannot change any more: not a trailing partial character (U+FFFD from a split
    byte sequence), nor a tail that may grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for s in stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - held


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Text up to the first stop string (a token may carry text past it)."""
    cuts = [text.index(x) for x in stop if x in text]
    return text[: min(cuts)] if cuts else text
