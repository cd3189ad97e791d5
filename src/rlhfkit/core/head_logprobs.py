"""Token log-probs (and entropies) straight from hidden states and the LM head, without (N, V) logits.

For N positions with hidden states h (N, H), an LM head W (V, H) (bias b optional) and labels y (N):

    l = (h W^T + b) / tau                       (logits at temperature tau, float32)
    log p(y) = l_y - logsumexp(l)
    H = logsumexp(l) - sum_v p_v l_v            (entropy, nats)

The logits are computed a chunk of rows at a time and dropped; only logsumexp (N,) is kept, and the backward
pass recomputes each chunk's logits. With a 49k-128k vocabulary the (N, V) float32 logits, their softmax and
their gradient are the largest tensors of an RLHF step (N = 2,000 response tokens x 49,152 = 400 MB each);
here the largest temporary is one chunk. Gradients (chain rule through l, see e.g. the derivation in
Liger-Kernel's fused linear cross-entropy, or any softmax text):

    d log p(y) / d l_j = [j = y] - p_j
    d H / d l_j        = -p_j (log p_j + H)
    d/d logits         = (d/d l) / tau;   dh = dlogits W;   dW = dlogits^T h;   db = sum_rows dlogits

The head runs in float32 whatever the dtype of h (see rollout/scoring.py for why bf16 logits are not enough).
"""

from __future__ import annotations

import torch

__all__ = ["head_logprobs"]

# Upper bound on elements of one chunk of logits (2**23 float32 = 32 MiB): rows per chunk = this // V.
# A module constant so that tests can shrink it to exercise the multi-chunk path.
_CHUNK_ELEMENTS = 2**23


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32 for half and single precision inputs; float64 stays float64 (gradient checks)."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """(n, H) -> (n, V) logits at the temperature, in the dtype of `weight` (float32, or float64 in tests)."""
    logits = h.to(weight.dtype) @ weight.t()
    if bias is not None:
        logits += bias
    if temperature != 1.0:
        logits /= temperature
    return logits


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, with_entropy: bool):
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # float32 under bf16 autocast too
            return _HeadLogprobs._forward(ctx, hidden, weight, bias, labels, temperature, with_entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, temperature, with_entropy):
        n = hidden.shape[0]
        ctype = _compute_dtype(hidden)
        w, b = weight.to(ctype), bias.to(ctype) if bias is not None else None
        valid = labels >= 0
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)  # (N, 1): gather needs an index
        logprobs, entropy, lse = (torch.zeros(n, dtype=ctype, device=hidden.device) for _ in range(3))
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, n, step):
            rows = slice(start, start + step)
            logits = _chunk_logits(hidden[rows], w, b, temperature)  # (n, V)
            chunk_lse = torch.logsumexp(logits, dim=1)  # (n,)
            lse[rows] = chunk_lse
            logprobs[rows] = logits.gather(1, safe[rows]).squeeze(1) - chunk_lse
            if with_entropy:
                # p * l is 0 * -inf = NaN where a logit is -inf (a masked vocabulary entry); those have p = 0.
                probs = torch.exp(logits - chunk_lse.unsqueeze(1))
                logits.masked_fill_(probs == 0, 0.0)
                entropy[rows] = chunk_lse - (probs * logits).sum(dim=1)
        logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        # An output the loss does not use (the entropy, when only logged) gets None, not a tensor of zeros,
        # so the backward can skip its term.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden = ctx.saved_tensors[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _HeadLogprobs._backward(ctx, grad_logprobs, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, safe, valid, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctype = _compute_dtype(hidden)
        g_lp = (grad_logprobs.to(ctype) * valid).unsqueeze(1) if grad_logprobs is not None else None  # (N, 1)
        g_h = grad_entropy.to(ctype).unsqueeze(1) if ctx.with_entropy and grad_entropy is not None else None
        if g_lp is None and g_h is None:
            return None, None, None, None, None, None
        w, b = weight.to(ctype), bias.to(ctype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=ctype, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=ctype, device=weight.device) if need_b else None
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            h = hidden[rows]
            logits = _chunk_logits(h, w, b, temperature)  # (n, V)
            log_p = logits.sub_(lse[rows].unsqueeze(1))  # in place: log p_j = l_j - lse
            probs = torch.exp(log_p)
            # d/dl_j = g_lp ([j = y] - p_j) + g_H (-p_j (log p_j + H))
            if g_h is not None:
                log_p.masked_fill_(probs == 0, 0.0).add_(entropy[rows].unsqueeze(1))  # log p_j + H
                grad = log_p.mul_(probs).mul_(-g_h[rows])
                if g_lp is not None:
                    grad.sub_(probs * g_lp[rows])
            else:
                grad = probs.mul_(-g_lp[rows])
            if g_lp is not None:
                grad.scatter_add_(1, safe[rows], g_lp[rows])
            if temperature != 1.0:
                grad /= temperature  # d/dlogits = (d/dl) / tau
            if need_h:
                grad_hidden[rows] = (grad @ w).to(hidden.dtype)
            if need_w:
                grad_weight.addmm_(grad.t(), h.to(ctype))
            if need_b:
                grad_bias += grad.sum(dim=0)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        if need_b:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                  bias: torch.Tensor | None = None,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax((h W^T + b) / tau)[label] at each position, and optionally the entropy, in float32.

    Args:
        hidden: ``(..., H)`` hidden states (any float dtype; computed in float32).
        weight: ``(V, H)`` LM head weight; ``bias``: ``(V,)`` or None.
        labels: ``hidden.shape[:-1]`` int64 token ids; negative ids (e.g. -100) give log-prob 0 and no gradient.
        temperature: > 0; sampling at tau draws from softmax(logits / tau), so scoring must use the same tau.
        with_entropy: also return the entropy (nats) of each position's distribution, differentiable.

    Returns:
        ``(logprobs, entropy)``, each ``hidden.shape[:-1]``, float32 (float64 for float64 hidden states);
        entropy None unless asked. Differentiable
        w.r.t. hidden, weight and bias; the backward recomputes the logits chunk by chunk.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = _HeadLogprobs.apply(flat_hidden, weight, bias, labels.reshape(-1), float(temperature),
                                               with_entropy)
    return logprobs.reshape(shape), entropy.reshape(shape) if with_entropy else None
