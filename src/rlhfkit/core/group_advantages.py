"""Critic-free advantages from groups of responses sampled for the same prompt.

GRPO, RLOO and Dr. GRPO sample ``K`` responses per prompt and score each with one scalar reward; the
baseline of a response is computed from the rewards of its own group instead of a learned value function.
With the rewards ``r_1 .. r_K`` of one group, ``mean = (1/K) sum_j r_j`` and the unbiased (Bessel-corrected)
standard deviation ``std = sqrt(sum_j (r_j - mean)^2 / (K - 1))``:

    GRPO      A_i = (r_i - mean) / (std + eps)
    Dr. GRPO  A_i = r_i - mean
    RLOO      A_i = r_i - (1 / (K - 1)) sum_{j != i} r_j = K / (K - 1) * (r_i - mean)

GRPO is Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
Models", sec. 4.1.2 (outcome supervision). The std is the unbiased one, as in ``torch.std``'s default and
TRL's ``GRPOTrainer``; the biased one would scale every advantage by ``sqrt(K / (K - 1))``. Dr. GRPO
(Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", sec. 3.1) drops the
division by the std: it up-weights groups whose rewards barely differ (questions that are too easy or too
hard), a difficulty bias. RLOO is the leave-one-out baseline of Kool et al. 2019, "Buy 4 REINFORCE Samples,
Get a Baseline for Free!", used for RLHF by Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
Style Optimization for Learning from Human Feedback in LLMs": the baseline does not depend on ``r_i``, so
the estimator stays unbiased; it is Dr. GRPO's advantage times ``K / (K - 1)``.

In all three the advantages of a group sum to zero and do not change when a constant is added to the
group's rewards; a group whose rewards are all equal gives every response an advantage of exactly 0 (no
learning signal; the metric ``grpo/frac_zero_std_groups`` counts such groups). A response's advantage is
then used for each of its tokens (see :func:`rlhfkit.core.grpo_loss.grpo_policy_loss`). All three are in
:data:`GROUP_ADVANTAGES` under one signature ``(rewards, group_size) -> (advantages, metrics)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

__all__ = ["GROUP_ADVANTAGES", "grpo_advantages", "rloo_advantages"]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` ``(B,)`` as a float ``(B / K, K)`` tensor, one group per row; validates the arguments."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2 (a baseline needs other samples), got {group_size!r}"
        )
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"the batch size {rewards.shape[0]} is not a multiple of group_size {group_size}: rewards "
            "must hold n_groups * group_size entries, each prompt's samples contiguous"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.reshape(-1, group_size)


def _group_stats(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For groups ``(G, K)``: ``r - mean`` ``(G, K)``, the unbiased std ``(G,)`` and whether each group is
    constant ``(G,)``; the first two are exactly 0 in a constant group. Equality is tested directly rather
    than ``std == 0``: the mean of ``K`` equal floats can differ from them by an ulp, which would leave a
    tiny nonzero advantage."""
    constant = (groups == groups[:, :1]).all(dim=1)
    mean = groups.mean(dim=1, keepdim=True)
    centred = torch.where(constant.unsqueeze(1), torch.zeros_like(groups), groups - mean)
    # torch.std's default (Bessel-corrected), written out so that an empty batch gives no warning.
    std = (centred.square().sum(dim=1) / (groups.shape[1] - 1)).sqrt()
    return centred, std, constant


def _metrics(groups: torch.Tensor, std: torch.Tensor, constant: torch.Tensor) -> dict[str, torch.Tensor]:
    """Group statistics, detached 0-dim tensors (0 for an empty batch)."""
    n_groups = max(groups.shape[0], 1)
    with torch.no_grad():
        metrics = {
            "grpo/reward_mean": groups.sum() / (n_groups * groups.shape[1]),
            "grpo/reward_std_within_group": std.sum() / n_groups,
            "grpo/frac_zero_std_groups": constant.to(groups.dtype).sum() / n_groups,
        }
    return {name: value.detach() for name, value in metrics.items()}


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages ``(r_i - mean) / (std + eps)``, or Dr. GRPO's ``r_i - mean`` without ``scale_by_std``.

    Args:
        rewards: ``(B,)`` sequence rewards, ``B = n_groups * group_size``; rows ``[g K, (g + 1) K)`` are the
            ``K`` samples of prompt ``g``. An integer tensor is converted to the default float dtype.
        group_size: ``K >= 2``, the samples per prompt.
        scale_by_std: divide by the group's unbiased std (GRPO, Shao et al. 2024) or not (Dr. GRPO, Liu et
            al. 2025).
        eps: ``>= 0``, added to the std before dividing. A group whose rewards are all equal has advantages
            exactly 0 whatever ``eps`` (so ``eps = 0`` is allowed).

    Returns:
        ``(advantages, metrics)``: ``advantages`` ``(B,)`` in the rewards' (float) dtype;
        ``metrics`` detached 0-dim tensors: ``grpo/reward_mean``, ``grpo/reward_std_within_group`` (the
        unbiased std of each group, averaged over groups) and ``grpo/frac_zero_std_groups`` (the fraction of
        groups whose rewards are all equal, which give zero advantage and so no gradient).
    """
    groups = _grouped(rewards, group_size)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    centred, std, constant = _group_stats(groups)
    if scale_by_std:
        # A constant group's centred rewards are 0 already; dividing them by 1 keeps eps = 0 from giving 0/0.
        denominator = torch.where(constant, torch.ones_like(std), std + eps)
        centred = centred / denominator.unsqueeze(1)
    return centred.reshape(-1), _metrics(groups, std, constant)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO advantages ``r_i - mean_{j != i} r_j``: the reward minus the mean of the group's other rewards.

    Args:
        rewards: ``(B,)`` sequence rewards, ``B = n_groups * group_size``; rows ``[g K, (g + 1) K)`` are the
            ``K`` samples of prompt ``g``. An integer tensor is converted to the default float dtype.
        group_size: ``K >= 2`` (with one sample there is no other to form a baseline).

    Returns:
        ``(advantages, metrics)``: ``advantages`` ``(B,)``, equal to ``K / (K - 1)`` times the Dr. GRPO
        ones; ``metrics`` the same group statistics as :func:`grpo_advantages`.
    """
    groups = _grouped(rewards, group_size)
    centred, std, constant = _group_stats(groups)
    # r_i - (K mean - r_i) / (K - 1) = (K r_i - K mean) / (K - 1)
    return (centred * (group_size / (group_size - 1))).reshape(-1), _metrics(groups, std, constant)


# Name -> advantage estimator, each (rewards (B,), group_size) -> (advantages (B,), metrics).
_AdvantageFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
GROUP_ADVANTAGES: dict[str, _AdvantageFn] = {
    "grpo": grpo_advantages,
    "dr_grpo": partial(grpo_advantages, scale_by_std=False),
    "rloo": rloo_advantages,
}
