"""Continuous batching: one scheduler thread owns the model, and requests for different adapters share a batch.

Every step: the rows of the running batch decode one token each, through one forward with the KV cache;
prompts waiting for a slot are prefilled together and join the batch; every row samples its next token with
its own settings and torch.Generator; rows that finished (or whose client left) leave. Each row runs
through its own adapter, or none, by PEFT's mixed-adapter batches (`adapter_names=`), never by switching the
model's active adapter.

Rows are left-padded to a common cache length, and their position ids start at 0 at their first real token
(GPT-2 has learned absolute positions), so a row's logits are those of the same request alone.

    rows (B, L): [pad pad p p p t t]   attention mask 0 on pads; positions [0 0 0 1 2 3 4]
                 [p p p p p p t t t]
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loramix.generate import Sampling, cut_at_stop

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
T = TypeVar("T")


class QueueFull(Exception):
    """The waiting queue holds `max_queue` prompts already."""


@dataclass
class Event:
    """What a sequence sends back: new text, and once it ended, why (or the error that ended it)."""

    index: int  # the prompt's place in its request
    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled"; None while it runs
    tokens: int = 0  # completion tokens so far
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One prompt of a request, from the queue to its last token.

    `adapter` names a PEFT adapter of the model, or is BASE (the base alone), or None for a model without adapters.
    `emit` is called from the scheduler's thread.
    """

    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    emit: Callable[[Event], None]
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text emitted so far
    done: bool = False
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Leave at the next step (a flag: safe from any thread)."""
        self.cancelled = True


@dataclass
class _Rows:
    """Sequences batched together with their KV cache ((B, H, L, D) per layer) and attention mask (B, L)."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor


class Scheduler:
    """Owns the model: `submit` from any thread; `step` (or the thread of `running`) generates.

    Args:
        model: a causal LM in eval mode; a PeftModel when sequences name adapters.
        tokenizer: decodes tokens to text; its EOS ends a sequence.
        max_batch: most sequences in the running batch.
        max_queue: most prompts waiting for a slot; `submit` raises QueueFull beyond.
        on_step: called with the number of rows after every step (metrics).
        log: one line per failed sequence.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 64, on_step: Callable[[int], None] | None = None, log=print):
        self.model, self.tokenizer, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        self.on_step, self.log = on_step, log
        self.eos = tokenizer.eos_token_id
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._rows: _Rows | None = None
        self._wake = threading.Condition()
        self._stopping = False

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        rows = self._rows
        return len(rows.seqs) if rows else 0

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences, all or none.

        Raises:
            QueueFull: `max_queue` prompts are waiting already.
        """
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} prompts are waiting for a batch slot (the limit)")
            self._waiting.extend(seqs)
            self._wake.notify()

    # ------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Generate in a thread of its own while the block runs; sequences still open at exit fail."""
        thread = threading.Thread(target=self._loop, name="loramix-scheduler", daemon=True)
        thread.start()
        try:
            yield
        finally:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._rows):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 (a bug in the loop itself: fail what is open, keep serving)
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._wake:
            left = list(self._waiting) + (self._rows.seqs if self._rows else [])
            self._waiting.clear()
            self._rows = None
        for seq in left:
            self._fail(seq, message)

    def step(self) -> dict[Sequence, torch.Tensor]:
        """One decode step of the running batch plus the prefill of admitted prompts; the logits (V,) each
        row sampled from, by sequence."""
        self._leave(lambda s: s.cancelled, "cancelled")
        new = self._admit()
        logits: dict[Sequence, torch.Tensor] = {}
        if self._rows:
            running = self._rows
            out = self._guarded(running.seqs, lambda: self._decode(running))
            if out is None:
                self._rows = None  # its rows failed, and its cache may be half updated
            else:
                logits |= dict(zip(running.seqs, out))
        if new:
            out = self._guarded(new, lambda: self._prefill(new))
            if out is not None:
                rows, first = out
                logits |= dict(zip(new, first))
                self._rows = _join(self._rows, rows) if self._rows else rows
        for seq, token in zip(logits, self._choose(logits)):
            if token is not None:
                self._advance(seq, token)
        self._leave(lambda s: s.done, None)
        if self.on_step is not None and logits:
            self.on_step(len(logits))
        return logits

    def _admit(self) -> list[Sequence]:
        new = []
        with self._wake:
            while self._waiting and self.batch_size + len(new) < self.max_batch:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._emit(seq, Event(seq.index, "", "cancelled"))
                else:
                    new.append(seq)
        return new

    def _guarded(self, seqs: list[Sequence], forward: Callable[[], T]) -> T | None:
        """What `forward` returns; if it fails, its rows fail (None) and the queue is spared."""
        try:
            return forward()
        except Exception as e:  # noqa: BLE001 (one bad batch must not stop the server)
            for seq in seqs:
                self._fail(seq, f"{type(e).__name__}: {e}")
            return None

    # ------------------------------------------------------------ forwards

    def _forward(self, seqs: list[Sequence], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Logits (B, V) of the last position of every row, each row through its own adapter."""
        adapters = [s.adapter for s in seqs]
        extra = {"adapter_names": adapters} if any(a is not None for a in adapters) else {}
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1].float()

    def _decode(self, rows: _Rows) -> torch.Tensor:
        device = rows.mask.device
        last = torch.tensor([[s.tokens[-1]] for s in rows.seqs], device=device)  # (B, 1)
        positions = rows.mask.sum(1, keepdim=True)  # a row's real tokens so far: the new token's position
        rows.mask = F.pad(rows.mask, (0, 1), value=1)
        return self._forward(rows.seqs, last, rows.mask, positions, rows.cache)

    def _prefill(self, seqs: list[Sequence]) -> tuple[_Rows, torch.Tensor]:
        device = self.model.device
        width = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([[0] * (width - len(s.prompt)) + s.prompt for s in seqs], device=device)  # pad ids are masked out
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
        cache = DynamicCache()
        logits = self._forward(seqs, ids, mask, positions, cache)
        return _Rows(list(seqs), cache, mask), logits

    # ------------------------------------------------------------ sampling and text

    def _choose(self, logits: dict[Sequence, torch.Tensor]) -> list[int | None]:
        """Every row's next token, sampled as one batch; if that fails, row by row, so that only the rows
        that fail alone fail (None)."""
        if not logits:
            return []
        seqs, rows = list(logits), torch.stack(list(logits.values()))
        try:
            return sample_rows(rows, seqs)
        except Exception:  # noqa: BLE001 (find the row at fault below)
            tokens = []
            for seq, row in zip(seqs, rows):
                try:
                    tokens += sample_rows(row[None], [seq])
                except Exception as e:  # noqa: BLE001 (this request fails; the batch goes on)
                    self._fail(seq, f"{type(e).__name__}: {e}")
                    tokens.append(None)
            return tokens

    def _advance(self, seq: Sequence, token: int) -> None:
        """Append seq's next token, send the text that is final by now, and end it on EOS, a stop string or its length."""
        try:
            seq.tokens.append(token)
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            s = seq.sampling
            cut = cut_at_stop(text, s.stop)
            if token == self.eos or len(cut) < len(text) or len(seq.tokens) >= s.max_new_tokens:
                seq.done = True
                reason = "length" if token != self.eos and len(cut) == len(text) else "stop"
                self._emit(seq, Event(seq.index, cut[seq.sent :], reason, len(seq.tokens)))
                return
            end = _settled(text, s.stop)
            if end > seq.sent:
                self._emit(seq, Event(seq.index, text[seq.sent : end], None, len(seq.tokens)))
                seq.sent = end
        except Exception as e:  # noqa: BLE001 (this request fails; the batch goes on)
            self._fail(seq, f"{type(e).__name__}: {e}")

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # noqa: BLE001 (the receiver is gone, its event loop closed: nobody to tell)
            seq.cancelled = True

    def _fail(self, seq: Sequence, message: str) -> None:
        self.log(f"request failed: {message}")
        seq.done = True
        self._emit(seq, Event(seq.index, "", None, len(seq.tokens), error=message))

    def _leave(self, gone: Callable[[Sequence], bool], reason: str | None) -> None:
        """Rows for which `gone` holds leave the batch (sent `reason` when it is set); leading pad columns no row needs go too."""
        rows = self._rows
        if rows is None:
            return
        keep = [k for k, s in enumerate(rows.seqs) if not gone(s)]
        for s in rows.seqs:
            if gone(s) and reason:
                s.done = True
                self._emit(s, Event(s.index, "", reason, len(s.tokens)))
        if len(keep) == len(rows.seqs):
            return
        if not keep:
            self._rows = None
            return
        index = torch.tensor(keep, device=rows.mask.device)
        mask = rows.mask[index]
        first = int(mask.any(0).int().argmax())  # rows are [pads][tokens]: columns before this are pads in every row
        kv = [(layer.keys[index, :, first:], layer.values[index, :, first:]) for layer in rows.cache.layers]
        self._rows = _Rows([rows.seqs[k] for k in keep], DynamicCache(kv), mask[:, first:])


def _join(a: _Rows, b: _Rows) -> _Rows:
    """One batch of two: the shorter cache is left-padded (masked) to the longer one's length."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        pad = [0, 0] * dim_from_end + [width - t.shape[-dim_from_end - 1], 0]
        return F.pad(t, pad)

    kv = [(torch.cat([left(x.keys, 1), left(y.keys, 1)]), torch.cat([left(x.values, 1), left(y.values, 1)]))
          for x, y in zip(a.cache.layers, b.cache.layers)]
    return _Rows(a.seqs + b.seqs, DynamicCache(kv), torch.cat([left(a.mask, 0), left(b.mask, 0)]))


def _settled(text: str, stop: tuple[str, ...]) -> int:
    """How much of `text` cannot change any more: not a trailing partial character (U+FFFD from a split
    byte sequence), nor a tail that may grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for s in stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - held


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The next token of every row of `logits` (B, V), each under its sequence's own settings and generator:
    repetition penalty as transformers applies it, then greedy at temperature 0, else temperature, top-k and
    top-p, and one uniform draw from the sequence's generator (so a seeded row draws the same alone or batched)."""
    logits = _penalized(logits, seqs)
    tokens = logits.argmax(-1).tolist()
    hot = [k for k, seq in enumerate(seqs) if seq.sampling.temperature > 0]
    if hot:
        for k, token in zip(hot, _draw(logits[hot], [seqs[k] for k in hot])):
            tokens[k] = token
    return tokens


def _penalized(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Logits of tokens already in a sequence (prompt or output) divided by its penalty (multiplied when negative)."""
    if all(seq.sampling.repetition_penalty == 1.0 for seq in seqs):
        return logits
    logits = logits.clone()
    for row, seq in zip(logits, seqs):
        penalty = seq.sampling.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(seq.prompt + seq.tokens, device=logits.device).unique()
            scores = row[seen]
            row[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    settings, device, vocab = [seq.sampling for seq in seqs], logits.device, logits.shape[-1]
    logits = logits / torch.tensor([s.temperature for s in settings], device=device)[:, None]
    if any(s.top_k for s in settings):
        k = torch.tensor([min(s.top_k or vocab, vocab) for s in settings], device=device)
        kth = logits.topk(int(k.max())).values.gather(1, (k - 1)[:, None])  # each row's k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    top_p = torch.tensor([s.top_p for s in settings], device=device)[:, None]
    if bool((top_p < 1).any()):
        ordered, order = probs.sort(-1, descending=True)
        beyond = ordered.cumsum(-1) - ordered >= top_p  # the mass before them reaches top_p already; the first always stays
        probs = probs.scatter(1, order, ordered.masked_fill(beyond, 0.0))
    for seq in seqs:
        if seq.generator is None:
            seq.generator = torch.Generator(device).manual_seed(seq.sampling.seed)
    # u in (0, 1]: the first token whose cumulative mass reaches u * total has mass > 0
    u = torch.stack([1 - torch.rand((), generator=seq.generator, device=device) for seq in seqs])
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=vocab - 1).squeeze(1).tolist()
