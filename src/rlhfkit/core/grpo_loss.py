"""GRPO policy loss: the clipped PPO surrogate with one advantage per response and a k3 KL penalty.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
eq. 3. For ``K`` responses ``o_i`` to one prompt, each with a sequence advantage ``A_i`` (see
:mod:`rlhfkit.core.group_advantages`) used for every one of its tokens, ``rho_{i,t} = pi(o_{i,t} | .) /
pi_old(o_{i,t} | .)`` the importance ratio and ``pi_ref`` the frozen reference model, the per-token loss is

    l_{i,t} = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps_high)) + beta * k3_{i,t}
    k3_{i,t} = exp(ref_{i,t} - logp_{i,t}) - (ref_{i,t} - logp_{i,t}) - 1

and the loss is an aggregation of the ``l_{i,t}`` (:data:`rlhfkit.core.ppo_loss.LOSS_AGGREGATIONS`;
DeepSeekMath's ``(1/K) sum_i (1/|o_i|) sum_t`` is ``"seq-mean-token-mean"``, Dr. GRPO's fixed-length
normalisation is ``"seq-mean-token-sum-norm"``, DAPO's is ``"token-mean"``). Unlike PPO in RLHF, which
puts ``-beta * KL`` into the reward, GRPO adds the KL to the loss directly, with Schulman's k3 estimator
(2020, "Approximating KL Divergence"): unbiased for ``KL(pi || pi_ref)`` when the tokens are samples of
``pi`` and never negative. Its gradient w.r.t. ``logp`` is ``1 - exp(ref - logp)``, zero where the policy
agrees with the reference. ``eps_high > eps`` is DAPO's clip-higher (Yu et al. 2025); ``beta = 0`` (as
in Dr. GRPO and DAPO) drops the KL term and the reference model.

Every aggregation is linear in the per-token losses for a fixed mask, so the loss is computed as the
aggregated surrogate of :func:`rlhfkit.core.ppo_loss.ppo_policy_loss` plus ``beta`` times the aggregated
k3 of :func:`rlhfkit.core.kl.kl_penalty`, which is the same number.
"""

from __future__ import annotations

import torch

from .kl import kl_penalty
from .masked import masked_mean
from .ppo_loss import aggregate_loss, ppo_policy_loss

__all__ = ["grpo_policy_loss"]


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "token-mean",
    max_tokens: int | None = None,
    clip_eps_high: float | None = None,
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss: clipped surrogate with sequence advantages plus ``beta`` times the k3 KL to the ref.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: ``(B, T)`` log-probs of the same tokens under the rollout policy (no grad). With one
            update per rollout they equal ``logprobs.detach()``, and the ratio is 1.
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference model (no grad); may be
            ``None`` when ``beta == 0``.
        advantages: ``(B,)`` one advantage per response, e.g. from
            :data:`rlhfkit.core.group_advantages.GROUP_ADVANTAGES`; broadcast over the response's tokens.
        mask: ``(B, T)`` bool or numeric, nonzero on real response tokens. The log-prob tensors may hold
            NaN/inf elsewhere (and ``advantages`` may be NaN for a row without real tokens), which changes
            neither the loss nor the gradient.
        clip_eps: the ratio is clipped to ``[1 - clip_eps, 1 + clip_eps_high]``.
        beta: the KL coefficient, ``>= 0``; 0 skips the KL term (and needs no ``ref_logprobs``).
        aggregation: a key of :data:`rlhfkit.core.ppo_loss.LOSS_AGGREGATIONS`, applied to the surrogate and
            the KL term alike.
        max_tokens: the generation length limit; required by ``"seq-mean-token-sum-norm"``, ignored by
            the other aggregations.
        clip_eps_high: upper clip bound (DAPO's clip-higher); ``None`` means ``clip_eps``.
        normaliser: units to divide both terms by (see :func:`rlhfkit.core.ppo_loss.aggregate_loss`);
            default this batch's own.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor. ``metrics`` holds detached 0-dim tensors: those of
        :func:`rlhfkit.core.ppo_loss.ppo_policy_loss` (``ppo/clipfrac``, ``ppo/dual_clipfrac``, always 0
        here, ``ppo/approx_kl``, the k3 KL to the *rollout* policy, ``ppo/ratio_mean`` and
        ``ppo/policy_loss``, the surrogate alone), ``grpo/kl`` (the mean k3 to the *reference* over real
        tokens; reported whenever ``ref_logprobs`` is given, even with ``beta == 0``, and absent when
        it is ``None``) and ``grpo/loss`` (the returned loss, surrogate plus KL term).

    As in :func:`rlhfkit.core.kl.kl_penalty`, the log ratio of the k3 term is clamped to ``[-20, 20]``
    before the ``exp``, so it cannot overflow; beyond the clamp its gradient is 0.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"advantages must be (B,) with one entry per response of logprobs {tuple(logprobs.shape)}, got "
            f"{tuple(advantages.shape)}"
        )
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if ref_logprobs is None and beta != 0:
        raise ValueError(f"ref_logprobs is required when beta != 0 (got beta={beta})")
    if ref_logprobs is not None and ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"ref_logprobs {tuple(ref_logprobs.shape)} and logprobs {tuple(logprobs.shape)} shapes differ"
        )

    surrogate, metrics = ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages.unsqueeze(1).expand(logprobs.shape),
        mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        aggregation=aggregation,
        max_tokens=max_tokens,
        normaliser=normaliser,
    )
    loss = surrogate
    if ref_logprobs is not None:
        keep = mask if mask.dtype == torch.bool else mask != 0
        zero = torch.zeros(
            (), dtype=torch.promote_types(logprobs.dtype, ref_logprobs.dtype), device=keep.device
        )
        # Clean before the exp: garbage on padding must reach neither the forward nor the backward pass.
        # With beta == 0 the k3 is only a metric and needs no graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and beta != 0):
            k3 = kl_penalty(torch.where(keep, logprobs, zero), torch.where(keep, ref_logprobs, zero), "k3")
        if beta != 0:
            loss = surrogate + beta * aggregate_loss(k3, keep, aggregation, max_tokens, normaliser)
        metrics["grpo/kl"] = masked_mean(k3.detach(), keep)
    metrics["grpo/loss"] = loss.detach()
    return loss, metrics
