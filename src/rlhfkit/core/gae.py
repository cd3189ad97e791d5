"""Generalized Advantage Estimation over response tokens.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
eqs. 11-16. Each response is one episode whose steps are its tokens; with ``d_{t+1} = 1`` when token
``t + 1`` is a real token of the same response and 0 when ``t`` is the last one (terminal state, value 0):

    delta_t = r_t + gamma * d_{t+1} * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * d_{t+1} * A_{t+1}          (so A_t = sum_l (gamma lam)^l delta_{t+l})
    R_t     = A_t + V_t                                           (the value-function target)

``lam = 1`` gives the Monte Carlo return minus the baseline (high variance, no bias from V);
``lam = 0`` gives the one-step TD error (low variance, biased by V).
"""

from __future__ import annotations

import torch

from .masked import masked_whiten

__all__ = ["gae_advantages", "whiten_advantages"]


def _check_discount(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets for a batch of responses.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. from :func:`rlhfkit.core.reward_shaping.shape_rewards`).
        values: ``(B, T)`` value estimates ``V(s_t)`` of the state before each response token.
        mask: ``(B, T)`` bool or numeric, nonzero on real response tokens. Responses are expected to be a
            run of real tokens followed by padding; the value after the last real token is 0 (terminal),
            and rewards/values where ``mask`` is 0 are ignored even if NaN/inf. A 0 inside a row is
            treated the same way, as an episode boundary.
        gamma: discount factor in ``[0, 1]`` (1 is the RLHF default: the episode is short and the score
            comes at its end).
        lam: GAE ``lambda`` in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and exactly 0 where ``mask`` is 0, with
        ``returns = advantages + values`` on real tokens. Advantages are not whitened (see
        :func:`whiten_advantages`): returns must be built from the raw ones.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must all be the same (B, T)"
        )
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)
    keep = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    # Clean before the scan: a NaN value after the end would otherwise flow into V_{t+1} of the last token.
    rewards = torch.where(keep, rewards.to(dtype), zero)
    values = torch.where(keep, values.to(dtype), zero)

    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=dtype, device=rewards.device)
    next_advantage = torch.zeros(batch, dtype=dtype, device=rewards.device)
    reversed_advantages = []
    # The recursion runs backwards in time, so it is a loop over T (vectorised over B), as in TRL/OpenRLHF.
    for t in range(length - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, zero)
        reversed_advantages.append(advantage)
        # values[:, t] and advantage are already 0 where token t is not real: that is d_{t+1} = 0 for t - 1.
        next_value, next_advantage = values[:, t], advantage
    if reversed_advantages:
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
    else:
        advantages = torch.zeros((batch, 0), dtype=dtype, device=rewards.device)
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


def whiten_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten advantages with the mean and variance of *all* real tokens of the batch.

    A thin wrapper over :func:`rlhfkit.core.masked.masked_whiten`. The statistics are pooled over the
    whole batch, not per row, as in TRL and OpenRLHF: per-row whitening would force every response to
    have mean-zero advantages, erasing the difference between good and bad responses that the sequence
    score creates. Call it once on the whole rollout batch, before splitting it into PPO micro-batches,
    so every micro-batch is scaled by the same statistics.

    Args:
        advantages: ``(B, T)`` from :func:`gae_advantages`.
        mask: ``(B, T)`` bool or numeric, nonzero on real response tokens.
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance before the square root.

    Returns:
        ``(B, T)`` whitened advantages, exactly 0 where ``mask`` is 0.
    """
    return masked_whiten(advantages, mask, shift_mean=shift_mean, eps=eps)
