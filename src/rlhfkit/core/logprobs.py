"""Token log-probabilities and entropies from language-model logits.

Vocabularies are large (49k for SmolLM2, 128k+ for Llama 3), so ``(B, T, V)`` logits are the biggest
activation in RLHF. ``F.log_softmax(logits).gather(...)`` writes a second ``(B, T, V)`` tensor only to
read ``B * T`` numbers from it. Here we instead gather the label logit and subtract ``logsumexp`` over
the vocabulary, using

    log p(y) = l_y - log sum_v exp(l_v),

and process the logits in chunks of whole sequences (or of rows of one sequence, for long ones) so that
every temporary (the temperature-scaled copy, the float32 upcast, ``logsumexp``'s internal ``exp``) is
at most one chunk big. (Under autograd each chunk's float32 upcast is kept for the backward pass, as any
upcast would be; chunking bounds the forward temporaries, not the saved activations.)

Half-precision logits (bf16/fp16) are upcast to float32 chunk by chunk and the result is float32:
bf16 has 8 bits of mantissa, so a bf16 log-prob of -2.0 is only known to about 0.01, and PPO/GRPO
importance ratios ``exp(logp_new - logp_old)`` built from such numbers are noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["entropy_from_logits", "logprobs_from_logits", "shift_for_causal_lm"]

# Upper bound on elements per chunk of rows (2**24 float32 = 64 MiB). A module constant so tests can
# shrink it to exercise the multi-chunk path.
_CHUNK_ELEMENTS = 2**24

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float32 if logits.dtype in _HALF_DTYPES else logits.dtype


def _upcast(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.float() if chunk.dtype in _HALF_DTYPES else chunk


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """View ``(..., T, V)`` logits as ``(B, T, V)``."""
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., T, V), got {tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.reshape(-1, *logits.shape[-2:])


def _map_chunks(logits: torch.Tensor, fn: Callable[[torch.Tensor, tuple], torch.Tensor]) -> torch.Tensor:
    """Apply a per-position reduction over the vocabulary chunk by chunk and reassemble the result.

    Args:
        logits: ``(B, T, V)``; may be a non-contiguous view (e.g. from :func:`shift_for_causal_lm`).
            Chunks are taken by slicing along B and T, never by flattening ``B * T``, because flattening
            a shifted view would copy the whole tensor, the very thing chunking is meant to avoid.
        fn: ``fn(chunk, index)`` with ``chunk = logits[index]`` upcast to float32 if half precision,
            shape ``(b, t, V)`` or ``(t, V)``; returns ``chunk.shape[:-1]``.

    Returns:
        ``(B, T)``.
    """
    b, t, vocab = logits.shape
    if b == 0 or t == 0:
        return torch.zeros((b, t), dtype=_out_dtype(logits), device=logits.device)
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if rows >= t:  # whole sequences fit: chunk over the batch only
        step = rows // t
        pieces = [fn(_upcast(logits[i : i + step]), (slice(i, i + step),)) for i in range(0, b, step)]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    sequences = []
    for i in range(b):
        parts = [fn(_upcast(logits[i, j : j + rows]), (i, slice(j, j + rows))) for j in range(0, t, rows)]
        sequences.append(torch.cat(parts))
    return torch.stack(sequences)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``(B, T, V)`` (``(T, V)`` or ``(..., T, V)`` also work), already aligned with ``labels``;
            for a causal LM pass them through :func:`shift_for_causal_lm` first.
        labels: ``(B, T)`` int64 token ids (shape ``logits.shape[:-1]``). Negative ids (the ``-100``
            ignore index of Hugging Face) are allowed and give 0; mask those positions out downstream.
        temperature: softmax temperature, > 0. Sampling at temperature tau draws from
            ``softmax(logits / tau)``, so policy-gradient methods must score samples with the same tau.

    Returns:
        ``(B, T)`` log-probabilities ``l_y / tau - logsumexp(l / tau)``; float32 for bf16/fp16 logits,
        otherwise ``logits.dtype``. Differentiable w.r.t. ``logits``.
    """
    _check_temperature(temperature)
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
    valid = labels >= 0
    # gather needs an in-range index even where the answer is discarded.
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1, labels.shape[-1])

    def label_logprob(chunk: torch.Tensor, index: tuple) -> torch.Tensor:
        if temperature != 1.0:
            chunk = chunk / temperature
        label_logit = chunk.gather(-1, safe_labels[index].unsqueeze(-1)).squeeze(-1)
        return label_logit - torch.logsumexp(chunk, dim=-1)

    out = _map_chunks(_as_3d(logits), label_logprob).reshape(labels.shape)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position.

    Uses ``H = logsumexp(l) - sum_v softmax(l)_v * l_v`` with ``l = logits / temperature``, which
    follows from ``log p_v = l_v - logsumexp(l)`` and needs no ``log_softmax`` copy.

    Args:
        logits: ``(B, T, V)`` (``(T, V)`` or ``(..., T, V)`` also work). Entries may be ``-inf``
            (vocabulary masking); they have probability 0 and contribute 0.
        temperature: softmax temperature, > 0.

    Returns:
        ``(B, T)`` entropies in nats; float32 for bf16/fp16 logits, otherwise ``logits.dtype``.
    """
    _check_temperature(temperature)

    def entropy(chunk: torch.Tensor, index: tuple) -> torch.Tensor:
        if temperature != 1.0:
            chunk = chunk / temperature
        probs = torch.softmax(chunk, dim=-1)
        # p * l is 0 * -inf = NaN for masked vocabulary entries; zero l there first, so neither the
        # forward nor the backward pass ever multiplies by -inf.
        zero = torch.zeros((), dtype=chunk.dtype, device=chunk.device)
        finite_logits = torch.where(probs > 0, chunk, zero)
        return torch.logsumexp(chunk, dim=-1) - (probs * finite_logits).sum(dim=-1)

    return _map_chunks(_as_3d(logits), entropy).reshape(logits.shape[:-1])


def shift_for_causal_lm(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM outputs with the tokens they predict.

    A causal LM's logits at position ``t`` are its distribution over token ``t + 1``. So the last logit
    predicts nothing in the sequence and the first token is never predicted; dropping both lines them up:
    ``logits[:, t]`` scores ``input_ids[:, t + 1]``. Any per-token mask (attention or completion mask)
    must be shifted like the labels, i.e. ``mask[:, 1:]``.

    Args:
        logits: ``(B, T, V)`` model outputs for ``input_ids``.
        input_ids: ``(B, T)`` the tokens fed to the model.

    Returns:
        ``(logits[:, :-1], input_ids[:, 1:])``: shapes ``(B, T - 1, V)`` and ``(B, T - 1)``, views
        (no copy), ready for :func:`logprobs_from_logits`.
    """
    return logits[:, :-1], input_ids[:, 1:]
