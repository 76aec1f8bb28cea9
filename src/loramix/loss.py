"""Per-token NLL of a batch: the model body under a mask that isolates documents, then the LM head
without ever holding (tokens, vocab) logits for a whole batch.

GPT-2's head is 50,257 wide: on small models it dominates time and memory, and an ordinary
`cross_entropy(logits)` keeps full-size logits, their softmax and their gradient alive at once.
`LinearCrossEntropy` walks the target positions in chunks and, in the same pass, computes each chunk's
gradient with respect to the hidden states, (softmax - onehot) @ W, so backward only scales that
(N, C) tensor by the incoming per-token gradient: two matmuls per chunk as in plain autograd, no
recomputation, and only one chunk of logits alive at a time. The head weight must be frozen (it is in
LoRA: GPT-2 ties it to the input embedding) and bias-free; otherwise the plain chunked path is used.
Gemma 2's final logit soft-capping, cap * tanh(logits / cap), and the logit scaling of Granite and Cohere
are applied on both paths, so the NLL is the stock model's own loss (the exactness probe checks it on
every model).

Packed rows need each document to see only itself: a block-diagonal causal mask, narrowed to the
sliding window for the layers that have one (Mistral, Gemma 2/3, Qwen with sliding layers); models
whose layers differ get one mask per layer type, the mapping transformers accepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loramix.data.packing import IGNORE, Batch
from loramix.model import unwrap


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, softcap: float | None, scale: float) -> torch.Tensor:
        """h (N, C), weight (V, C) frozen, targets (N,) -> NLL (N,) in fp32 of logits scale * (W h), soft-capped."""
        nll = torch.empty(len(targets), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, len(targets), chunk):
            t = targets[i : i + chunk]
            cols = torch.arange(len(t), device=t.device)
            # Logits as (V, n): the wide matrix is the matmul's output, which the BLAS writes faster in
            # this layout; the softmax then reduces over dim 0.
            logits = (weight @ h[i : i + chunk].T).float()  # (V, n)
            if scale != 1.0:
                logits = logits.mul_(scale)
            if softcap:  # y = cap * tanh(z / cap), dy/dz = 1 - tanh^2
                logits = logits.div_(softcap).tanh_()
                slope = 1 - logits.square()
                logits = logits.mul_(softcap)
            target_logit = logits[t, cols]
            # One exp pass, in place (the softmax reuses the logits' memory): lse = max + log(sum(exp)).
            peak = logits.amax(dim=0)
            exp = logits.sub_(peak).exp_()
            total = exp.sum(dim=0)
            nll[i : i + chunk] = peak + total.log() - target_logit
            if grad_h is not None:
                probs = exp.div_(total)
                probs[t, cols] -= 1.0
                if softcap:
                    probs.mul_(slope)
                if scale != 1.0:
                    probs.mul_(scale)
                grad_h[i : i + chunk] = probs.T.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_nll[:, None].to(grad_h.dtype), None, None, None, None, None


def head_nll(h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, softcap: float | None = None, chunk: int = 256,
             scale: float = 1.0) -> torch.Tensor:
    """NLL (N,) of `targets` under `head` applied to hidden states h (N, C), logits multiplied by `scale`, then
    soft-capped at `softcap`."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if not weight.requires_grad and bias is None:
        return LinearCrossEntropy.apply(h, weight, targets, chunk, softcap, scale)
    pieces = [F.cross_entropy(_logits(head, h[i : i + chunk], scale, softcap), targets[i : i + chunk], reduction="none")
              for i in range(0, len(targets), chunk)]
    return torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)


def attention_mask(segment_ids: torch.Tensor, config=None):
    """What the model body needs to keep documents apart.

    segment_ids: (B, T), 0 = padding. One segment per row: the (B, T) padding mask (the model applies
    its own causal and sliding-window masks). Packed rows: (B, 1, T, T) masks, True = may attend
    (additive floats for eager attention), block-diagonal causal, narrowed to `config.sliding_window`
    for sliding layers; a dict by layer type where the model's layers differ (`config.layer_types`).
    """
    if int(segment_ids.max()) <= 1:
        return (segment_ids > 0).long()
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    # Padding (segment 0) attends to earlier padding: no query row is fully masked, so SDPA never
    # produces NaN there, and real tokens never see padding because their segment differs.
    full = (same & torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril())[:, None]
    window = getattr(config, "sliding_window", None)
    pos = torch.arange(T, device=segment_ids.device)
    sliding = full & (pos[:, None] - pos[None, :] < window) if window else full  # as transformers' sliding_window_overlay
    eager = getattr(config, "_attn_implementation", None) == "eager"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return _as_mask(sliding, eager)
    return {kind: _as_mask(sliding if kind == "sliding_attention" else full, eager) for kind in set(layer_types)}


def _as_mask(allowed: torch.Tensor, additive: bool) -> torch.Tensor:
    """Eager attention adds its mask to the scores: 0 where allowed, the lowest float elsewhere."""
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def token_nll(model, batch: Batch) -> torch.Tensor:
    """Per-position NLL in fp32, (B, T), 0 where the target is IGNORE.

    The LM head runs only on positions that have a target (padding costs nothing there), through
    `head_nll`, which never materialises the batch's full logits.
    """
    lm = unwrap(model)
    if lm.config._attn_implementation == "flash_attention_2":
        # Varlen FlashAttention: one flattened row, which transformers cuts into documents at every
        # position-id restart (padding positions become one-token documents whose targets are ignored).
        B, T = batch.input_ids.shape
        hidden = lm.base_model(input_ids=batch.input_ids.view(1, B * T), position_ids=batch.position_ids.view(1, B * T)).last_hidden_state.view(B, T, -1)
    else:
        hidden = lm.base_model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=attention_mask(batch.segment_ids, lm.config)
        ).last_hidden_state  # (B, T, C)
    keep = batch.targets != IGNORE
    nll = hidden.new_zeros(keep.shape, dtype=torch.float32)
    nll[keep] = head_nll(hidden[keep], lm.get_output_embeddings(), batch.targets[keep], getattr(lm.config, "final_logit_softcapping", None),
                         scale=logit_scale(lm.config))
    return nll


def head_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM `lm`'s logits (N, V) in fp32 for hidden states (N, C): its head, then its own forward's scale
    and soft cap (generation's counterpart of `head_nll`)."""
    return _logits(lm.get_output_embeddings(), hidden, logit_scale(lm.config), getattr(lm.config, "final_logit_softcapping", None))


def _logits(head: torch.nn.Module, h: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """head(h) in fp32, multiplied by `scale`, then soft-capped at `softcap` (out of place: autograd may run through it)."""
    logits = head(h).float()
    if scale != 1.0:
        logits = logits * scale
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def logit_scale(config) -> float:
    """What the model's causal-LM head multiplies its logits by: Granite divides them by `logits_scaling`,
    Cohere multiplies them by `logit_scale` (read from the config, whatever the model type)."""
    divisor = getattr(config, "logits_scaling", None)
    return 1.0 / divisor if divisor else float(getattr(config, "logit_scale", None) or 1.0)
