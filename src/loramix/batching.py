"""Continuous batching: one scheduler thread owns the model, and requests for different adapters share a batch.

Every step runs the running rows' next token through one forward with the KV cache and, when prompts were
waiting for a slot, their prefill through another, whose cache then joins the batch's; every row samples its
next token with its own settings and torch.Generator, and rows that finished (or whose client left) leave.
Each row runs through its own adapter, or none, by PEFT's mixed-adapter batches (`adapter_names=`), never by
switching the model's active adapter. A model whose layers fold the batch into the token dimension before an
adapted module (OPT's MLP) cannot mix adapters in one forward: there a batch holds one adapter's rows at a
time, run with that adapter active, and requests for other adapters wait for it to drain.

Rows share the cache's columns: a row's tokens are its last columns, left-padded with masked ones, and
position ids count each row's own tokens from 0 (GPT-2 has learned absolute positions), so a row's logits are
those of the same request alone. Prefilling new prompts apart costs a second forward's overheads but runs
only their tokens: in one forward with the running rows, every running row would run the longest prompt's
width too (16 rows x 14 positions for one 14-token prompt). Columns no row needs any more go when rows leave.

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
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loramix.generation import Sampling, cut_at_stop

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
    text: str = ""  # the text of tokens[:read_at], decoded a few tokens at a time (see _text)
    prefix_at: int = 0
    read_at: int = 0
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
        self.mixes = _mixes_adapters(model)
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
        """The next token of the running rows and the prompts of the admitted ones; then every row samples.
        Returns the logits (V,) each row sampled from, by sequence."""
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

    def _forward(self, running: _Rows | None, new: list[Sequence]) -> tuple[_Rows, torch.Tensor]:
        """The batch after this step's forwards (decode, prefill or both, joined), and the logits (B, V) of every
        row's last position, each row through its own adapter."""
        device, parts = self.model.device, []
        if running:
            parts.append(self._run(*_decode_inputs(running, device)))
        if new:
            parts.append(self._run(*_prefill_inputs(new, device)))
        rows = parts[0][0] if len(parts) == 1 else _join(parts[0][0], parts[1][0])
        return rows, torch.cat([logits for _, logits in parts])

    def _run(self, seqs: list[Sequence], ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> tuple[_Rows, torch.Tensor]:
        adapters = [s.adapter for s in seqs]
        extra = {"adapter_names": adapters} if self.mixes and any(a is not None for a in adapters) else {}
        with torch.inference_mode(), contextlib.nullcontext() if extra or adapters[0] is None else _only(self.model, adapters[0]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return _Rows(seqs, cache, mask), out.logits[:, -1].float()

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
            text = _text(self.tokenizer, seq)
            s = seq.sampling
            cut = cut_at_stop(text, s.stop)
            if token == self.eos or len(cut) < len(text) or len(seq.tokens) >= s.max_new_tokens:
                seq.done = True
                reason = "length" if token != self.eos and len(cut) == len(text) else "stop"
                self._emit(seq, Event(seq.index, cut[seq.sent :], reason, len(seq.tokens)))
                return
            end = _settled(text, s.stop) if seq.stream else 0
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


def _mixes_adapters(model) -> bool:
    """Whether PEFT's mixed-adapter batches work on this model: every adapted module must see the batch
    as its first dimension (OPT's MLP sees batch x tokens, which PEFT refuses). Probed with hooks of our
    own on a plain forward (a refused mixed forward would leave PEFT's hooks behind). LoRA on MoE expert
    weights (PEFT's ParamWrapper) takes no mixed batches at all."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    if any(isinstance(m, ParamWrapper) for m in model.modules()):
        return False

    rows: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: rows.add(args[0].shape[0])) for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros((2, 3), dtype=torch.long, device=model.device))
    finally:
        for handle in handles:
            handle.remove()
    return rows <= {2}


def _only(model, adapter: str):
    """The model with one adapter active (BASE: none), for a batch of that adapter's rows alone."""
    if adapter == BASE:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


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
    return new, *(torch.tensor(x, device=device) for x in (ids, positions, mask)), DynamicCache()


def _join(a: _Rows, b: _Rows) -> _Rows:
    """Two batches as one, the narrower one's rows padded on the left with masked columns."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    kv, masks = [], []
    for rows in (a, b):
        pad = width - rows.mask.shape[1]
        kv.append([(F.pad(layer.keys, (0, 0, pad, 0)), F.pad(layer.values, (0, 0, pad, 0))) for layer in rows.cache.layers])  # (B, H, L, D)
        masks.append(F.pad(rows.mask, (pad, 0)))
    joined = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(*kv)]
    return _Rows(a.seqs + b.seqs, DynamicCache(joined), torch.cat(masks))


def _select(rows: _Rows, keep: list[int]) -> _Rows:
    """The batch's rows `keep`, without the leading columns none of them uses any more (a row's tokens are its
    last columns): rows and columns picked in one copy."""
    index = torch.tensor(keep, device=rows.mask.device)
    mask = rows.mask[index]
    cut = mask.shape[1] - int(mask.sum(1).max())
    kv = [(layer.keys[index, :, cut:], layer.values[index, :, cut:]) for layer in rows.cache.layers]
    return _Rows([rows.seqs[k] for k in keep], DynamicCache(kv), mask[:, cut:])


def _text(tokenizer, seq: Sequence) -> str:
    """seq's text so far, decoding its newest tokens only, as transformers' streamers and vLLM do: decoding all
    of them each step costs a row O(length) a step (16 rows of 1,000 tokens: ~1 ms). The tokens decoded just
    before them come along and their text is taken off, since a token's text may depend on the one before (a
    SentencePiece word's leading space); the text settles once it ends in a whole character."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    before, now = decode(seq.tokens[seq.prefix_at : seq.read_at]), decode(seq.tokens[seq.prefix_at :])
    new = now[len(before) :]
    if new and not new.endswith("\ufffd"):
        seq.text, seq.prefix_at, seq.read_at, new = seq.text + new, seq.read_at, len(seq.tokens), ""
    return seq.text + new


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
    maxima = _chunk_maxima(logits)
    drawn = [k for k, seq in enumerate(seqs) if seq.sampling.temperature > 0]
    tokens = _greedy(logits, maxima).tolist() if len(drawn) < len(seqs) else [0] * len(seqs)  # ~5 us a row: no need to pick the rows
    if drawn:
        for k, token in zip(drawn, _draw(logits, maxima, drawn, [seqs[k] for k in drawn])):
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


def _draw(logits: torch.Tensor, maxima: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> list[int]:
    """One token for each of `rows` of `logits` by inverse CDF in vocabulary order: the same draw picks the same
    token whether the row is sampled alone or among rows of other settings."""
    settings, device = [seq.sampling for seq in seqs], logits.device
    ids, logits = _candidates(logits, maxima, rows, [s.top_k for s in settings])
    probs = (logits / torch.tensor([s.temperature for s in settings], device=device)[:, None]).softmax(-1)
    nucleus = [k for k, s in enumerate(settings) if s.top_p < 1]
    if nucleus:
        probs[nucleus] = _nucleus(probs[nucleus], torch.tensor([settings[k].top_p for k in nucleus], device=device)[:, None])
    for seq in seqs:
        if seq.generator is None:
            seq.generator = torch.Generator(device).manual_seed(seq.sampling.seed)
    # u in (0, 1]: the first token whose cumulative mass reaches u * total has mass > 0
    u = torch.stack([1 - torch.rand((), generator=seq.generator, device=device) for seq in seqs])
    cdf = probs.cumsum(-1)
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
    return (picks if ids is None else ids.gather(1, picks)).squeeze(1).tolist()


def _candidates(logits: torch.Tensor, maxima: torch.Tensor, rows: list[int], top_k: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`rows` of `logits` with each one's top-k applied (0: all tokens). When every row has a top-k, only the
    largest k columns are kept, in vocabulary order, with their token ids (b, k); else the ids are None (all, in
    order). Temperature comes later: it does not change which tokens are the largest."""
    vocab = logits.shape[-1]
    ks = [min(k, vocab) if k else vocab for k in top_k]
    ids = None
    if max(ks) < vocab:  # sampling needs only these columns: a softmax over (b, k) instead of (b, V)
        ids = _top(logits, maxima, rows, max(ks)).sort(-1).values
        logits = _pick(logits, torch.tensor(rows, device=logits.device)[:, None], ids)
    else:
        logits = logits[rows]
    limited = [r for r, k in enumerate(ks) if k < logits.shape[-1]]
    if limited:
        k = torch.tensor([ks[r] for r in limited], device=logits.device)
        kth = logits[limited].topk(int(k.max())).values.gather(1, (k - 1)[:, None])  # each row's k-th largest
        logits[limited] = logits[limited].masked_fill(logits[limited] < kth, float("-inf"))
    return ids, logits


# Greedy and top-k read the vocabulary in chunks of this many columns: a maximum per chunk (one vectorized
# pass), then only the chunks that can hold the answer. torch's argmax and topk over a 50,257-token row take
# 40-80 us on this project's CPUs; this takes 10-20.
_CHUNK = 64


def _chunk_maxima(logits: torch.Tensor) -> torch.Tensor:
    """(B, ceil(V / _CHUNK)): each row's maximum over columns [c * _CHUNK, (c + 1) * _CHUNK)."""
    rows, vocab = logits.shape
    whole = vocab // _CHUNK * _CHUNK
    parts = [logits[:, :whole].reshape(rows, -1, _CHUNK).amax(-1)]
    if whole < vocab:
        parts.append(logits[:, whole:].amax(-1, keepdim=True))
    return torch.cat(parts, 1)


def _in_chunks(logits: torch.Tensor, rows: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of chunks (b, m) of `rows` (b, 1) of logits: their ids and values (b, m * _CHUNK), -inf past the
    vocabulary's end."""
    vocab = logits.shape[-1]
    ids = (chunks[..., None] * _CHUNK + torch.arange(_CHUNK, device=logits.device)).flatten(1)
    values = _pick(logits, rows, ids.clamp(max=vocab - 1)).masked_fill(ids >= vocab, float("-inf"))
    return ids, values


def _pick(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits[rows, ids] for rows (b, 1) and ids (b, m), by flat index (faster than indexing with two tensors)."""
    return logits.contiguous().take(rows * logits.shape[-1] + ids)


def _greedy(logits: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), ties to the first column as there: the first chunk holding a row's maximum, then the
    first column of that chunk holding it."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    ids, values = _in_chunks(logits, rows, maxima.argmax(-1, keepdim=True))
    return ids.gather(1, values.argmax(-1, keepdim=True)).squeeze(1)


def _top(logits: torch.Tensor, maxima: torch.Tensor, rows: list[int], k: int) -> torch.Tensor:
    """The ids of the k largest logits of each of `rows` (b, k), as logits[rows].topk(k) finds them (in another
    order): they lie in the k chunks whose maxima are largest, since k chunk maxima are k values of the row, so
    its k-th largest value is at least their k-th largest."""
    if k * _CHUNK * 4 > logits.shape[-1]:  # a wide top-k: few chunks to skip
        return logits[rows].topk(k).indices
    at = torch.tensor(rows, device=logits.device)[:, None]
    ids, values = _in_chunks(logits, at, maxima[rows].topk(k).indices)
    return ids.gather(1, values.topk(k).indices)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`probs` (B, V) with all but each row's nucleus zeroed: its fewest most likely tokens whose mass reaches
    top_p (B, 1). The nucleus is sought among the top 64, 512, ... tokens, so the vocabulary is sorted
    whole only for a row whose nucleus is that wide (a flat distribution)."""
    k, vocab = 64, probs.shape[-1]
    while True:
        ordered, order = probs.topk(min(k, vocab))  # (B, k), descending
        if k >= vocab or bool((ordered.sum(-1, keepdim=True) >= top_p).all()):
            break
        k *= 8
    beyond = ordered.cumsum(-1) - ordered >= top_p  # the mass before them reaches top_p already; the first always stays
    return torch.zeros_like(probs).scatter(1, order, ordered.masked_fill(beyond, 0.0))
