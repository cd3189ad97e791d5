"""Bradley-Terry pairwise loss for reward models.

Bradley & Terry (1952), "Rank Analysis of Incomplete Block Designs: I. The Method of Paired
Comparisons", model the probability that ``a`` is preferred to ``b`` as ``sigmoid(r(a) - r(b))``.
A reward model is trained by maximum likelihood of human preferences, InstructGPT eq. 1
(Ouyang et al. 2022, "Training language models to follow instructions with human feedback"):

    loss = -E[ log sigmoid(r(x, y_chosen) - r(x, y_rejected)) ].

Llama 2 (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", sec. 3.2.2)
subtracts a margin m(r) that grows with how clearly annotators preferred one answer:

    loss = -log sigmoid(r_chosen - r_rejected - m).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "pairwise_accuracy"]


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum(w * v) / sum(w)``; pairs with ``w == 0`` are dropped even if ``v`` is NaN/inf there.

    With no weights this is the plain mean. If every weight is 0 the result is 0.
    """
    if weights is None:
        return values.mean()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    kept = weights != 0
    # where, not multiply: a zero-weight pair's value may be inf/NaN and 0 * inf is NaN.
    weighted = torch.where(kept, values, zero) * torch.where(kept, weights.to(values.dtype), zero)
    total_weight = weights.to(values.dtype).sum()
    return weighted.sum() / torch.where(total_weight != 0, total_weight, torch.ones_like(total_weight))


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor, **others: torch.Tensor | None) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} shapes differ")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != chosen.shape:
            raise ValueError(
                f"{name} shape {tuple(tensor.shape)} must equal the scores' {tuple(chosen.shape)}"
            )


def pairwise_accuracy(
    chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of pairs the scores order correctly.

    Args:
        chosen: ``(B,)`` scores of the preferred responses.
        rejected: ``(B,)`` scores of the rejected responses.
        weights: optional ``(B,)`` per-pair weights; the accuracy is their weighted mean, so weight-0
            pairs (e.g. padding) do not count.

    Returns:
        0-dim float tensor: mean of 1 where ``chosen > rejected``, 0.5 on ties (a tie is a coin flip,
        and an untrained model that scores everything equal should read 0.5, not 0), 0 otherwise.
    """
    _check_pairs(chosen, rejected, weights=weights)
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    correct = (chosen > rejected).to(dtype) + 0.5 * (chosen == rejected).to(dtype)
    return _weighted_mean(correct, weights)


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the preferences under the Bradley-Terry model.

    ``loss = sum_i w_i * -log sigmoid(s+_i - s-_i - m_i) / sum_i w_i`` (plain mean without weights,
    ``m = 0`` without margin). ``F.logsigmoid`` keeps it finite and exact for score gaps of any size,
    where ``log(sigmoid(d))`` underflows to ``log(0) = -inf`` at ``d`` around -100 in float32.

    The gradient w.r.t. ``s+_i`` is ``-w_i * (1 - sigmoid(d_i)) / sum(w)``, so confidently correct pairs
    contribute almost nothing.

    Args:
        chosen_scores: ``(B,)`` reward-model scores of the preferred responses.
        rejected_scores: ``(B,)`` scores of the rejected responses.
        margin: optional ``(B,)`` required gap (Llama 2); larger for clearer preferences.
        weights: optional ``(B,)`` non-negative per-pair weights. The loss and the metrics are weighted
            means, so weight-0 pairs change nothing, even if their scores are NaN/inf. All-zero weights
            give loss 0.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor; ``metrics`` holds detached 0-dim tensors
        ``reward/accuracy`` (see :func:`pairwise_accuracy`), ``reward/margin`` (mean ``s+ - s-``, without
        the Llama-2 margin), ``reward/chosen`` (mean ``s+``) and ``reward/rejected`` (mean ``s-``).
    """
    _check_pairs(chosen_scores, rejected_scores, margin=margin, weights=weights)
    gap = chosen_scores - rejected_scores
    logits = gap if margin is None else gap - margin
    if weights is not None:
        # Zero the dropped pairs *before* logsigmoid too: its backward multiplies the (zero) incoming
        # gradient by 1 - sigmoid(NaN) = NaN, which would flow back into the scores' producer.
        logits = torch.where(weights != 0, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    loss = _weighted_mean(-F.logsigmoid(logits), weights)
    with torch.no_grad():
        metrics = {
            "reward/accuracy": pairwise_accuracy(chosen_scores, rejected_scores, weights),
            "reward/margin": _weighted_mean(gap, weights),
            "reward/chosen": _weighted_mean(chosen_scores, weights),
            "reward/rejected": _weighted_mean(rejected_scores, weights),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}
