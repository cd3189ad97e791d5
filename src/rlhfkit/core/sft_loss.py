"""Supervised fine-tuning loss: negative log-likelihood of the completion tokens only.

The prompt is context, not a target, so only completion tokens (``loss_mask == 1``) are scored, as in
InstructGPT's SFT stage (Ouyang et al. 2022, "Training language models to follow instructions with
human feedback").

Token-level normalisation and gradient accumulation: averaging each micro-batch's loss over its own
tokens and then averaging micro-batches weights a token in a short micro-batch more than one in a long
micro-batch, so k accumulation steps are *not* one big batch. Hugging Face fixed this in transformers
in late 2024 ("Fixing Gradient Accumulation", Oct 2024) by dividing every micro-batch's summed loss by
the total number of loss tokens in the accumulation window. Pass that total as ``num_tokens`` and the
summed micro-batch losses (and gradients) equal the full-batch ones exactly.
"""

from __future__ import annotations

import torch

from .masked import masked_sum

__all__ = ["completion_nll_loss"]


def completion_nll_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-summed completion NLL divided by a token count.

    ``loss = -sum_{b,t} mask[b,t] * logprobs[b,t] / N``, with ``N = num_tokens`` if given, else the
    number of loss tokens in this batch. ``N`` is clamped to at least 1, so a batch (or accumulation
    window) with no completion tokens gives loss 0 rather than NaN.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the target tokens (e.g. from
            :func:`rlhfkit.core.logprobs.logprobs_from_logits` after shifting). Masked-out positions may
            hold ``-inf``/NaN and do not affect the loss or its gradient.
        loss_mask: ``(B, T)`` bool or numeric, nonzero on completion tokens.
        num_tokens: total number of loss tokens across all micro-batches of one gradient-accumulation
            window (and across data-parallel ranks, if gradients are averaged over them the same way).
            ``None`` normalises by this batch's own count.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor; ``metrics`` holds detached 0-dim tensors
        ``sft/nll`` (mean NLL per loss token of *this* batch, whatever ``num_tokens`` is) and
        ``sft/tokens`` (this batch's loss-token count).
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    keep = loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0
    total_nll = -masked_sum(logprobs, keep)
    # Counts in at least float32: bf16 cannot even represent 257 exactly.
    count_dtype = torch.promote_types(logprobs.dtype, torch.float32)
    count = keep.sum().to(count_dtype)
    if num_tokens is None:
        normaliser = count.clamp(min=1)
    else:
        normaliser = torch.as_tensor(num_tokens, dtype=count_dtype, device=logprobs.device).clamp(min=1)
    loss = total_nll / normaliser
    metrics = {
        "sft/nll": (total_nll / count.clamp(min=1)).detach(),
        "sft/tokens": count.detach(),
    }
    return loss, metrics
