"""Reductions over the kept positions of a masked tensor.

Every function takes ``x`` and a ``mask`` of the same (or broadcastable) shape. The mask may be bool or
numeric; any nonzero entry means "kept". Masked-out entries of ``x`` may hold anything, including NaN or
inf (padding after a sampled EOS, ``-inf`` log-probs of pad tokens, ...), and never affect a result or its
gradient. That is why masking is done with ``torch.where`` rather than multiplication: ``nan * 0`` is NaN,
while ``torch.where(keep, x, 0)`` is a clean 0. The cleaned tensor is also what every later step uses, so
no NaN can reach a backward pass through an unselected ``where`` branch either.

None of these functions synchronise with the device (no ``.item()``); empty masks are handled with
tensor ops.
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten"]


def _keep(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor of ``x``'s shape: True where ``mask`` is nonzero."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    return torch.broadcast_to(keep, x.shape)


def _count_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _clean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out entries replaced by 0 (so NaN/inf garbage there is gone)."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x`` over the kept positions.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x`` (or broadcastable to it); bool or numeric, nonzero = kept.
        dim: dimension(s) to reduce; ``None`` reduces everything to a 0-dim tensor.

    Returns:
        ``x`` summed over ``dim`` with masked-out entries counted as 0, e.g. ``(B,)`` for ``dim=1``.
    """
    keep = _keep(x, mask)
    cleaned = _clean(x, keep)
    return cleaned.sum() if dim is None else cleaned.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the kept positions.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x`` (or broadcastable to it); bool or numeric, nonzero = kept.
        dim: dimension(s) to reduce; ``None`` averages over every kept entry.

    Returns:
        ``sum(x[kept]) / count(kept)`` reduced over ``dim``. A slice with no kept entry has mean 0 (not
        NaN): its sum is 0 and the count is clamped to 1, so an all-padding row cannot poison a batch.
    """
    keep = _keep(x, mask)
    cleaned = _clean(x, keep)
    if dim is None:
        total, count = cleaned.sum(), keep.sum()
    else:
        total, count = cleaned.sum(dim=dim), keep.sum(dim=dim)
    return total / count.clamp(min=1).to(_count_dtype(x))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all kept positions (a 0-dim tensor).

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x`` (or broadcastable to it); bool or numeric, nonzero = kept.
        unbiased: apply Bessel's correction ``n / (n - 1)`` (as ``torch.var`` does by default).

    Returns:
        ``sum((x - mean)^2) / n`` over the ``n`` kept entries, times ``n / (n - 1)`` when ``unbiased``. The
        correction is skipped when ``n <= 1`` (TRL raises there instead; a single kept token is legitimate
        in RLHF batches, and its variance is simply 0). An empty mask gives 0.
    """
    keep = _keep(x, mask)
    cleaned = _clean(x, keep)
    count = keep.sum().to(_count_dtype(x))
    mean = cleaned.sum() / count.clamp(min=1)
    # Centre the cleaned tensor and re-mask: masked-out entries would otherwise contribute mean^2.
    centred = torch.where(keep, cleaned - mean, torch.zeros((), dtype=cleaned.dtype, device=x.device))
    var = (centred * centred).sum() / count.clamp(min=1)
    if unbiased:
        bessel = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
        var = var * bessel
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance using statistics of the kept positions only.

    Used for advantage whitening in PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms";
    the ``whiten`` of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", carried
    into TRL and OpenRLHF). Padding must not shift the statistics, hence the mask.

    Args:
        x: any shape, e.g. advantages ``(B, T)``.
        mask: same shape as ``x`` (or broadcastable to it); bool or numeric, nonzero = kept.
        shift_mean: if True return ``(x - mean) / sqrt(var + eps)``. If False add the mean back,
            ``(x - mean) / sqrt(var + eps) + mean``, as TRL/OpenRLHF do for rewards: only the scale
            changes and the sign of the mean is preserved.
        eps: added to the variance before the square root, so a constant ``x`` does not divide by 0.

    Returns:
        Tensor of ``x``'s shape; masked-out positions are exactly 0 so they can never leak downstream.
        ``var`` is the unbiased :func:`masked_var`, matching TRL.
    """
    keep = _keep(x, mask)
    cleaned = _clean(x, keep)
    mean = masked_mean(cleaned, keep)
    var = masked_var(cleaned, keep, unbiased=True)
    whitened = (cleaned - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _clean(whitened, keep)
