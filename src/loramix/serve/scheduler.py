"""Continuous batching: one scheduler thread owns the model, and requests for different adapters share a batch.

Every step runs the running rows' next token through one forward with the KV cache and, when prompts were
waiting for a slot, their prefill through another, whose cache then joins the batch's; every row samples its
next token with its own settings and torch.Generator, and rows that finished (or whose client left) leave.
Each row runs through its own adapter, or none, by the gathered LoRA pass (serve/lora.py). A model whose adapters
cannot be split by token (LoRA on experts' stacked weights) batches one adapter's rows at a time, and requests for
other adapters wait for them to drain. Adapters are added and removed between steps (`call`, `retire`).

Rows share the cache's columns: a row's tokens are its last columns, left-padded with masked ones, and
position ids count each row's own tokens from 0 (GPT-2 has learned absolute positions), so a row's logits are
those of the same request alone. Prefilling new prompts apart costs a second pass through the model's body but
runs only their tokens: in one forward with the running rows, every running row would run the longest prompt's
width too (16 rows x 14 positions for one 14-token prompt). The LM head then runs once, on every row's last hidden
state. Columns no row needs any more go when rows leave.
The cache's layers (serve/kv.py) keep room for more rows and columns, so a decode step writes its column in
place, rows joining are copied into the room for rows, and rows leaving make way for the last ones.

    decode    cache          | input  position        prefill (new prompts)  | inputs      positions
      row a   [- - p p t t]  | [t]    4                 row c                  | [-  p  p]   0 0 1
      row b   [p p p p p t]  | [t]    5                 row d                  | [p  p  p]   0 1 2
    then c and d's cache, 3 columns wide, is padded on the left to the batch's 7 and joined to it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loramix.loss import head_logits
from loramix.model import unwrap
from loramix.serve import kv
from loramix.serve.detokenizer import Detokenizer, cut_at_stop, settled
from loramix.serve.lora import Adapters
from loramix.serve.sampler import Sampling, sample_rows

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

    `adapter` names a served adapter, or is BASE (the base alone), or None for a model without adapters.
    `emit` is called from the scheduler's thread: with text as it settles when `stream`, else once, at the end.
    """

    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    emit: Callable[[Event], None]
    index: int = 0
    stream: bool = True
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text emitted so far
    text: Detokenizer | None = None
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
    """Owns the model: `submit` and `call` from any thread; `step` (or the thread of `running`) generates.

    Args:
        model: a causal LM in eval mode, or the `Adapters` of one (when sequences name adapters).
        tokenizer: decodes tokens to text; its EOS ends a sequence.
        max_batch: most sequences in the running batch.
        max_queue: most prompts waiting for a slot; `submit` raises QueueFull beyond.
        on_step: called with the number of rows after every step (metrics).
        log: one line per failed sequence.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 64, on_step: Callable[[int], None] | None = None, log=print):
        self.adapters = model if isinstance(model, Adapters) else None
        self.model = model.model if self.adapters else model
        self.tokenizer, self.max_batch, self.max_queue = tokenizer, max_batch, max_queue
        self.on_step, self.log = on_step, log
        self.eos = tokenizer.eos_token_id
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._rows: _Rows | None = None
        self._calls: list[tuple[Callable[[], object], Future]] = []
        self._retiring: set[str] = set()
        self._wake = threading.Condition()
        self._stopping = False

    @property
    def mixes(self) -> bool:
        """Whether rows of different adapters share a forward."""
        return self.adapters is None or self.adapters.mixes

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

    def call(self, fn: Callable[[], T]) -> Future:
        """Run `fn` in the scheduler's thread between two steps (to change the model); its result or error in the Future."""
        future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def retire(self, adapter: str) -> None:
        """Remove `adapter` once no queued or running sequence uses it (scheduler thread: through `call`)."""
        self._retiring.add(adapter)
        self._remove_retired()

    def _remove_retired(self) -> None:
        if not self._retiring:
            return
        with self._wake:
            busy = {s.adapter for s in list(self._waiting) + (self._rows.seqs if self._rows else [])}
        for adapter in self._retiring - busy:
            self.adapters.remove(adapter)
            self._retiring.discard(adapter)

    def _run_calls(self) -> None:
        with self._wake:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 (the caller gets it)
                future.set_exception(e)

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
                while not (self._stopping or self._waiting or self._rows or self._calls):
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
        """The next token of the running rows and the prompts of the admitted ones; then every row samples.
        Returns the logits (V,) each row sampled from, by sequence."""
        self._run_calls()
        self._leave(lambda s: s.cancelled, "cancelled")
        new, running = self._admit(), self._rows
        seqs = (running.seqs if running else []) + new
        if not seqs:
            return {}
        out = self._guarded(seqs, lambda: self._forward(running, new))
        if out is None:
            self._rows = None  # its rows failed, and its cache may be half updated
            return {}
        self._rows, logits = out
        for seq, token in zip(seqs, self._choose(seqs, logits)):
            if token is not None:
                self._advance(seq, token)
        self._leave(lambda s: s.done, None)
        self._remove_retired()
        if self.on_step is not None:
            self.on_step(len(seqs))
        return dict(zip(seqs, logits))

    def _admit(self) -> list[Sequence]:
        new, passed = [], []
        with self._wake:
            adapter = self._rows.seqs[0].adapter if self._rows else None
            while self._waiting and self.batch_size + len(new) < self.max_batch:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._emit(seq, Event(seq.index, "", "cancelled"))
                elif self.mixes or (adapter or seq.adapter) == seq.adapter or not (self._rows or new):
                    adapter = adapter or seq.adapter
                    new.append(seq)
                else:  # another adapter, on a model that cannot mix them: it waits, in order
                    passed.append(seq)
            self._waiting.extendleft(reversed(passed))
        return sorted(new, key=lambda seq: seq.adapter or "")  # each adapter's prompts together (None: no adapters)

    def _guarded(self, seqs: list[Sequence], forward: Callable[[], T]) -> T | None:
        """What `forward` returns; if it fails, its rows fail (None) and the queue is spared."""
        try:
            return forward()
        except Exception as e:  # noqa: BLE001 (one bad batch must not stop the server)
            for seq in seqs:
                self._fail(seq, f"{type(e).__name__}: {e}")
            return None

    # ------------------------------------------------------------ forwards

    def _forward(self, running: _Rows | None, new: list[Sequence]) -> tuple[_Rows, torch.Tensor]:
        """The batch after this step's forwards (decode, prefill or both, joined), and the logits (B, V) of every
        row's last position, each row through its own adapter. The bodies run apart, the LM head once on all rows:
        its weights are read once a step (GPT-2's head, 25 MB, is most of a tiny model's step)."""
        device, parts = self.model.device, []
        if running:
            parts.append(self._run(*_decode_inputs(running, device)))
        if new:
            parts.append(self._run(*_prefill_inputs(new, device)))
        rows = parts[0][0] if len(parts) == 1 else _join(parts[0][0], parts[1][0], self.max_batch)
        hidden = parts[0][1] if len(parts) == 1 else torch.cat([hidden for _, hidden in parts])
        with torch.inference_mode(), self._routed(rows.seqs):  # an adapter may adapt the head too
            return rows, head_logits(unwrap(self.model), hidden)

    def _run(self, seqs: list[Sequence], ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: DynamicCache) -> tuple[_Rows, torch.Tensor]:
        """One forward of `seqs` through the model's body: their rows, and each one's last hidden state (B, C)."""
        with torch.inference_mode(), self._routed(seqs):
            out = unwrap(self.model).base_model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return _Rows(seqs, cache, mask), out.last_hidden_state[:, -1]

    def _routed(self, seqs: list[Sequence]) -> contextlib.AbstractContextManager:
        return self.adapters.routed([s.adapter for s in seqs]) if self.adapters else contextlib.nullcontext()

    # ------------------------------------------------------------ sampling and text

    def _choose(self, seqs: list[Sequence], rows: torch.Tensor) -> list[int | None]:
        """Every row's next token, sampled as one batch; if that fails, row by row, so that only the rows
        that fail alone fail (None)."""
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
            s = seq.sampling
            ended = token == self.eos or len(seq.tokens) >= s.max_new_tokens
            if not (seq.stream or s.stop or ended):  # nothing reads its text before the end: decoded once then (16 rows: ~0.15 ms a step)
                return
            seq.text = seq.text or Detokenizer(self.tokenizer)
            text = seq.text.update(seq.tokens)
            cut = cut_at_stop(text, s.stop)
            if ended or len(cut) < len(text):
                seq.done = True
                reason = "length" if token != self.eos and len(cut) == len(text) else "stop"
                self._emit(seq, Event(seq.index, cut[seq.sent :], reason, len(seq.tokens)))
                return
            end = settled(text, s.stop) if seq.stream else 0
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
        """Rows for which `gone` holds leave the batch (sent `reason` when it is set); leading columns no row needs go too."""
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
        self._rows = _select(rows, keep)


def _decode_inputs(rows: _Rows, device) -> tuple[list[Sequence], torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """The running rows' last tokens and their positions (B, 1: a row's tokens so far), the mask one column
    wider (B, L + 1) and the cache."""
    ids = torch.tensor([[seq.tokens[-1]] for seq in rows.seqs], device=device)
    return rows.seqs, ids, rows.mask.sum(1, keepdim=True), F.pad(rows.mask, (0, 1), value=1), rows.cache


def _prefill_inputs(new: list[Sequence], device) -> tuple[list[Sequence], torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """New prompts left-padded to the longest (B, W), positions from 0 at each one's first token, mask, no cache."""
    width = max(len(seq.prompt) for seq in new)
    pads = [width - len(seq.prompt) for seq in new]
    ids = [[0] * pad + seq.prompt for pad, seq in zip(pads, new)]  # pad ids are masked out
    positions = [[0] * pad + list(range(len(seq.prompt))) for pad, seq in zip(pads, new)]
    mask = [[0] * pad + [1] * len(seq.prompt) for pad, seq in zip(pads, new)]
    return new, *(torch.tensor(x, device=device) for x in (ids, positions, mask)), kv.cache()


def _join(a: _Rows, b: _Rows, most_rows: int) -> _Rows:
    """`b`'s rows after `a`'s (whose cache takes them in), the narrower one's rows padded on the left with masked
    columns."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    masks = [F.pad(rows.mask, (width - rows.mask.shape[1], 0)) for rows in (a, b)]
    kv.join(a.cache, b.cache, width, most_rows)
    return _Rows(a.seqs + b.seqs, a.cache, torch.cat(masks))


def _select(rows: _Rows, keep: list[int]) -> _Rows:
    """The batch's rows `keep` (in the order that moves fewest in the cache), without the leading columns none of
    them uses any more (a row's tokens are its last columns)."""
    order = kv.compact(keep)
    mask = rows.mask[torch.tensor(order, device=rows.mask.device)]
    cut = mask.shape[1] - int(mask.sum(1).max())
    kv.select(rows.cache, order, cut)
    return _Rows([rows.seqs[k] for k in order], rows.cache, mask[:, cut:])
