"""Direct preference losses: DPO, conservative DPO (cDPO) and IPO, on per-sequence log-probabilities.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model") shows that the KL-regularised RLHF objective is solved by a policy whose log ratio to the
reference is the reward, up to a per-prompt constant: ``r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) +
beta * log Z(x)``. Inserted into the Bradley-Terry model (see :mod:`rlhfkit.core.bradley_terry`) the
``Z(x)`` cancel, and preference learning becomes a classification loss on the policy itself (eq. 7).
With the sequence log-probs ``pi_c, pi_r`` of the chosen and rejected responses under the policy and
``ref_c, ref_r`` under the frozen reference, write the log-ratio difference

    h = (pi_c - ref_c) - (pi_r - ref_r).

Then, per pair,

    sigmoid (DPO):  loss = -log sigmoid(beta * h)
    cDPO:           loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (IPO):      loss = (h - 1 / (2 * beta))^2

cDPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO", eq. 3) assumes each
label is flipped with probability ``eps``: the loss is the cross-entropy against the soft target
``1 - eps``, whose minimum is at ``sigmoid(beta * h) = 1 - eps`` instead of at ``h = +inf``. IPO (Azar et
al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17)
regresses ``h`` onto the finite target ``1 / (2 * beta)`` (their ``tau`` is our ``beta``), so it does not
overfit deterministic preferences the way the unbounded logistic loss can.

``beta * (pi - ref)`` is the *implicit reward* of a response (the ``log Z(x)`` term dropped, since only
differences between responses to the same prompt are identified); its statistics are the standard DPO
metrics. The loss types live in :data:`DPO_LOSSES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .bradley_terry import pairwise_accuracy
from .masked import masked_mean, masked_sum

__all__ = ["DPO_LOSSES", "dpo_loss", "implicit_rewards", "sequence_logps"]


# Per-pair losses ----------------------------------------------------------------------------------------
#
# Each takes the log-ratio difference ``h`` ``(B,)``, ``beta > 0`` and ``label_smoothing`` in [0, 0.5)
# (already validated) and returns the per-pair losses ``(B,)``.


def _sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # F.logsigmoid is exact for any |beta * h|; log(sigmoid(z)) is log(0) = -inf at z around -100 in
    # float32 (and its gradient NaN). logsigmoid(-z) is finite too, so eps = 0 gives exactly -logsigmoid(z).
    logits = beta * h
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    if label_smoothing != 0:
        raise ValueError(
            f"label_smoothing applies to the 'sigmoid' loss only; IPO has no label noise model, got "
            f"label_smoothing={label_smoothing}"
        )
    return (h - 1 / (2 * beta)).square()


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
}


# Checks ---------------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> None:
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")


def _check_same_1d(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected equal (B,) shapes, got {shapes}")


# Public functions ---------------------------------------------------------------------------------------


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO implicit reward ``beta * (policy_logps - ref_logps)`` of each response.

    Args:
        policy_logps: ``(B,)`` sequence log-probs of the responses under the policy.
        ref_logps: ``(B,)`` sequence log-probs of the same responses under the reference model.
        beta: the DPO temperature, ``> 0``.

    Returns:
        ``(B,)`` rewards, not detached (the gradient flows to ``policy_logps``); detach them to log them.
        Only differences between responses to the same prompt are meaningful (``log Z(x)`` is dropped).
    """
    _check_same_1d(policy_logps=policy_logps, ref_logps=ref_logps)
    _check_beta(beta)
    return beta * (policy_logps - ref_logps)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability: the sum (or mean) of the per-token log-probs over the response.

    Args:
        token_logps: ``(B, T)`` log-probs of the target tokens, e.g. from
            :func:`rlhfkit.core.logprobs.logprobs_from_logits` after shifting.
        mask: ``(B, T)`` bool or numeric, nonzero on the response tokens to score. Elsewhere
            ``token_logps`` may hold anything (NaN, ``-inf`` of pad tokens): it changes neither the result
            nor the gradient, which is 0 there.
        average: ``False`` for the sum, ``log pi(y|x)`` (what DPO's derivation uses). ``True`` for the
            length-normalised mean over the response tokens, as TRL computes for its IPO loss and as
            SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
            Reward") uses, which removes the incentive to prefer longer or shorter responses.

    Returns:
        ``(B,)`` in the dtype of ``token_logps``. A row with an empty mask gives 0 (for the mean as well:
        the token count is clamped to 1).
    """
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must be the same (B, T)"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    # masked_sum / masked_mean mask with torch.where, so NaN/inf at masked positions cannot leak.
    return masked_mean(token_logps, keep, dim=1) if average else masked_sum(token_logps, keep, dim=1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss of a batch of preference pairs, averaged over the pairs.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (see the module docstring): ``"sigmoid"`` is
    ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)`` (DPO for ``eps = 0``, cDPO
    otherwise); ``"ipo"`` is ``(h - 1 / (2 * beta))^2``.

    The gradient of the sigmoid loss w.r.t. ``pi_c`` is ``beta / B * (eps * sigmoid(z) - (1 - eps) *
    sigmoid(-z))`` with ``z = beta * h``: negative (raising the chosen log-prob lowers the loss) while
    ``z < log((1 - eps) / eps)``, i.e. always for plain DPO, and positive beyond, where cDPO pulls an
    over-confident pair back. The gradient w.r.t. ``pi_r`` is its negation.

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses under the policy (with
            grad), e.g. from :func:`sequence_logps`.
        policy_rejected_logps: ``(B,)`` the same for the rejected responses.
        ref_chosen_logps: ``(B,)`` chosen log-probs under the frozen reference model (no grad).
        ref_rejected_logps: ``(B,)`` rejected log-probs under the reference model (no grad).
        beta: ``> 0``; the strength of the implicit KL regularisation (DPO's ``beta``, IPO's ``tau``).
            Smaller ``beta`` lets the policy move further from the reference.
        loss_type: a key of :data:`DPO_LOSSES`: ``"sigmoid"`` or ``"ipo"``.
        label_smoothing: ``eps`` in ``[0, 0.5)``, the assumed probability that a label is flipped (cDPO);
            ``0`` is plain DPO. At ``0.5`` the labels carry no information. Must be 0 for ``"ipo"``.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor, the mean of the per-pair losses. ``metrics`` holds
        detached 0-dim tensors, each a mean over the pairs: ``dpo/chosen_reward`` (implicit reward
        ``beta * (pi_c - ref_c)``), ``dpo/rejected_reward`` (``beta * (pi_r - ref_r)``), ``dpo/margin``
        (chosen minus rejected reward, i.e. ``beta * h``), ``dpo/accuracy`` (1 where the chosen reward is
        strictly larger, 0.5 on ties, 0 otherwise, as :func:`rlhfkit.core.bradley_terry.pairwise_accuracy`
        counts reward-model accuracy), ``dpo/logps_chosen`` and ``dpo/logps_rejected`` (policy log-probs).
        TRL counts ties as 0 instead; the difference shows at the first step, where the policy equals
        the reference, every reward is 0, and this accuracy reads 0.5 (chance) rather than TRL's 0.
    """
    _check_same_1d(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if policy_chosen_logps.shape[0] == 0:
        raise ValueError("dpo_loss needs at least one preference pair, got an empty batch")
    _check_beta(beta)
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_log_ratio - rejected_log_ratio
    loss = DPO_LOSSES[loss_type](h, beta, label_smoothing).mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen_log_ratio
        rejected_rewards = beta * rejected_log_ratio
        metrics = {
            "dpo/chosen_reward": chosen_rewards.mean(),
            "dpo/rejected_reward": rejected_rewards.mean(),
            "dpo/margin": (chosen_rewards - rejected_rewards).mean(),
            "dpo/accuracy": pairwise_accuracy(chosen_rewards, rejected_rewards),
            "dpo/logps_chosen": policy_chosen_logps.mean(),
            "dpo/logps_rejected": policy_rejected_logps.mean(),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}
