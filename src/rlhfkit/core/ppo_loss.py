"""PPO losses: the clipped policy surrogate, the clipped value loss, and explained variance.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7. With the importance ratio
``rho_t = pi(a_t | s_t) / pi_old(a_t | s_t)`` of the token sampled under the rollout policy ``pi_old``,
PPO maximises ``min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)``; as a loss to minimise:

    loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high)).

``eps_low != eps_high`` is DAPO's "clip-higher" (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"): a larger ``eps_high`` lets unlikely tokens with positive
advantage grow faster, against entropy collapse. Dual clip (Ye et al. 2020, "Mastering Complex Control
in MOBA Games with Deep Reinforcement Learning", eq. 5) also bounds the loss for ``A_t < 0``, where the
max above is unbounded in ``rho_t``:

    loss_t = min(loss_t, -A_t * c)   for A_t < 0, with c > 1.

The per-token losses are reduced to a scalar by one of :data:`LOSS_AGGREGATIONS` (shared with GRPO).
With ``l_{i,t}`` the loss of token ``t`` of response ``i``, ``|o_i|`` its number of real tokens, ``B'`` the
number of non-empty responses, ``B`` the number of rows and ``L`` the generation length limit:

    token-mean               sum_{i,t} l_{i,t} / sum_i |o_i|
    seq-mean-token-sum       (1 / B') sum_i sum_t l_{i,t}
    seq-mean-token-mean      (1 / B') sum_i (1 / |o_i|) sum_t l_{i,t}        (the original GRPO)
    seq-mean-token-sum-norm  (1 / B)  sum_i (1 / L) sum_t l_{i,t}            (Dr. GRPO)

The last is Dr. GRPO's (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
sec. 3.1): the ``1 / |o_i|`` of the original GRPO gives the tokens of short responses larger gradients, so
a correct (positive-advantage) answer is pushed to be short and a wrong one to be long; dividing by the
constant ``L`` instead weights every token by the same ``1 / (B L)``, whatever the lengths in the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kl import kl_penalty
from .masked import masked_mean, masked_sum, masked_var

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "loss_units",
    "explained_variance",
    "ppo_policy_loss",
    "ppo_value_loss",
]

# exp(20) is about 5e8: far beyond any clip range, and far from float32 overflow (exp(89) = inf), whose
# inf * 0 in the backward pass of an unselected branch would turn every gradient into NaN (verl clamps
# the same way).
_MAX_LOG_RATIO = 20.0


# Loss aggregation ---------------------------------------------------------------------------------------
#
# Each takes per-token losses ``(B, T)``, a bool ``keep`` ``(B, T)``, ``max_tokens`` (used only by
# seq-mean-token-sum-norm, which needs the constant) and the ``normaliser`` (the number of units the loss
# averages over: see :func:`loss_units`) and returns a 0-dim loss: a sum over units divided by the normaliser. They differ in how much
# weight a token gets: token-mean weights every real token of the batch equally (long responses count
# more; DAPO's choice); seq-mean-token-mean weights every response equally, so a token of a short response
# counts more (the original GRPO); seq-mean-token-sum weights every response by its length, summing rather
# than averaging inside a response; seq-mean-token-sum-norm is seq-mean-token-sum divided by the constant
# ``max_tokens`` (Dr. GRPO). Rows without real tokens are not responses: seq-mean-token-sum and
# seq-mean-token-mean average over rows with at least one real token (0 if there are none).
# seq-mean-token-sum-norm averages over all B rows, as Dr. GRPO's code does (an empty row adds 0), so its
# token weight 1 / (B * max_tokens) is a constant of the batch shape and does not move with the masks.


def _token_mean(losses: torch.Tensor, keep: torch.Tensor, max_tokens: int | None, normaliser) -> torch.Tensor:
    return masked_sum(losses, keep) / normaliser


def _seq_mean_token_sum(losses: torch.Tensor, keep: torch.Tensor, max_tokens: int | None, normaliser) -> torch.Tensor:
    return masked_sum(masked_sum(losses, keep, dim=1), keep.any(dim=1)) / normaliser


def _seq_mean_token_mean(losses: torch.Tensor, keep: torch.Tensor, max_tokens: int | None, normaliser) -> torch.Tensor:
    return masked_sum(masked_mean(losses, keep, dim=1), keep.any(dim=1)) / normaliser


def _seq_mean_token_sum_norm(
    losses: torch.Tensor, keep: torch.Tensor, max_tokens: int | None, normaliser
) -> torch.Tensor:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' needs max_tokens, the generation length limit, as an "
            f"int >= 1; got {max_tokens!r}"
        )
    # mean_i (sum_t l_it / max_tokens) = (sum of all real tokens) / (B * max_tokens); 0 for an empty batch.
    return masked_sum(losses, keep) / (normaliser * max_tokens)


LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def loss_units(mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """How many units ``aggregation`` averages over in a ``(B, T)`` batch (a 0-dim float tensor): its real
    tokens (``"token-mean"``), its responses with at least one real token (``"seq-mean-token-sum"``,
    ``"seq-mean-token-mean"``) or its rows (``"seq-mean-token-sum-norm"``).

    Sum it over the micro-batches of an optimizer step (and, with several processes, all-reduce the sum) and
    pass the total to :func:`aggregate_loss` as ``normaliser``: the micro-batches' losses then add up to the
    loss of the whole step, divided once by the right total (verl's ``agg_loss`` with a global token count).
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    keep = mask if mask.dtype == torch.bool else mask != 0
    if aggregation == "token-mean":
        count = keep.sum()
    elif aggregation == "seq-mean-token-sum-norm":
        count = torch.tensor(keep.shape[0], device=keep.device)
    else:
        count = keep.any(dim=1).sum()
    return count.to(torch.get_default_dtype())


def aggregate_loss(
    losses: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token-mean",
    max_tokens: int | None = None,
    normaliser: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses ``(B, T)`` over the real tokens (``mask`` nonzero) to a 0-dim loss.

    ``aggregation`` is a key of :data:`LOSS_AGGREGATIONS`: ``"token-mean"`` (mean over all real tokens),
    ``"seq-mean-token-sum"`` (sum within each response, mean over responses), ``"seq-mean-token-mean"``
    (mean within each response, mean over responses) or ``"seq-mean-token-sum-norm"`` (sum within each
    response divided by the constant ``max_tokens``, mean over all ``B`` rows; Dr. GRPO). Entries where
    ``mask`` is 0 may be NaN/inf.

    ``max_tokens`` is the generation length limit (``max_new_tokens``), an int >= 1. It is required by
    ``"seq-mean-token-sum-norm"`` (ValueError without it) and ignored by the other modes. It should be the
    same constant for every batch of a run, not the padded width ``T`` of one batch, or the token weights
    vary again; a response longer than ``max_tokens`` is not an error, it just weighs more than 1 / B.

    ``normaliser`` is the number of units to divide by: by default this batch's own
    (:func:`loss_units`), so the result is the batch's mean; with gradient accumulation, the total over the
    micro-batches of the step, so that their losses add up to the step's. Below 1 it counts as 1 (an empty
    batch has loss 0).
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    if losses.dim() != 2 or losses.shape != mask.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and mask {tuple(mask.shape)} must be the same (B, T)")
    keep = mask if mask.dtype == torch.bool else mask != 0
    if normaliser is None:
        normaliser = loss_units(keep, aggregation)
    normaliser = torch.as_tensor(normaliser, dtype=losses.dtype, device=losses.device).clamp(min=1)
    return LOSS_AGGREGATIONS[aggregation](losses, keep, max_tokens, normaliser)


# Losses -------------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected equal (B, T) shapes, got {shapes}")


def _cleaner(keep: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Replaces entries where ``keep`` is False by 0, so garbage never reaches a forward or backward op."""
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return lambda x: torch.where(keep, x, zero)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    max_tokens: int | None = None,
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate loss (optionally clip-higher and dual-clip).

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: ``(B, T)`` log-probs of the same tokens under the rollout policy (no grad).
        advantages: ``(B, T)`` advantages, usually whitened GAE (no grad).
        mask: ``(B, T)`` bool or numeric, nonzero on real response tokens; all three tensors may hold
            NaN/inf elsewhere, which changes neither the loss nor the gradient.
        clip_eps: default for both clip bounds.
        clip_eps_low: ratio lower bound is ``1 - clip_eps_low``; ``None`` means ``clip_eps``.
        clip_eps_high: ratio upper bound is ``1 + clip_eps_high``; ``None`` means ``clip_eps``.
        dual_clip: ``c > 1`` bounding the loss of negative-advantage tokens by ``-A * c``; ``None`` off.
        aggregation: a key of :data:`LOSS_AGGREGATIONS`.
        max_tokens: the generation length limit; required by ``"seq-mean-token-sum-norm"``, ignored by
            the other aggregations (see :func:`aggregate_loss`).
        normaliser: units to divide by (see :func:`aggregate_loss`); default this batch's own.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor. ``metrics`` holds detached 0-dim tensors, each a
        mean over real tokens: ``ppo/clipfrac`` (the clipped branch was strictly larger, so the token
        has zero gradient), ``ppo/dual_clipfrac`` (the dual clip was active; 0 when off),
        ``ppo/approx_kl`` (the k3 estimate ``(rho - 1) - log rho`` of ``KL(pi_old || pi)``: the tokens
        are samples of ``pi_old``, k3 is unbiased and non-negative, and has lower variance than TRL's
        k2 ``0.5 * log(rho)^2``, which is biased), ``ppo/ratio_mean`` and ``ppo/policy_loss`` (the
        loss).

    The log ratio is clamped to ``[-20, 20]`` before the ``exp`` so an extreme ratio cannot overflow to
    inf and poison the backward pass with NaN; such a token is clipped anyway (or, with ``A < 0`` and no
    dual clip, its gradient is cut to 0 at ``rho = e^20``).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_low = clip_eps if clip_eps_low is None else clip_eps_low
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 <= eps_low <= 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= clip_eps_low <= 1 and clip_eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (it bounds the loss at -A * dual_clip), got {dual_clip}")

    keep = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, old_logprobs.dtype), advantages.dtype)
    clean = _cleaner(keep, dtype)
    logprobs, old_logprobs, advantages = clean(logprobs), clean(old_logprobs), clean(advantages)

    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    token_losses = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros_like(keep)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (dual_bound < token_losses)
        token_losses = torch.where(dual_active, dual_bound, token_losses)
    loss = aggregate_loss(token_losses, keep, aggregation, max_tokens, normaliser)

    with torch.no_grad():
        metrics = {
            "ppo/clipfrac": masked_mean((pg_clipped > pg_unclipped).to(dtype), keep),
            "ppo/dual_clipfrac": masked_mean(dual_active.to(dtype), keep),
            "ppo/approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), keep),
            "ppo/ratio_mean": masked_mean(ratio, keep),
            "ppo/policy_loss": loss,
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float | None = 0.2,
    aggregation: str = "token-mean",
    max_tokens: int | None = None,
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of PPO2 (OpenAI baselines), as in TRL and OpenRLHF.

    ``V_clip = clip(V, V_old - c, V_old + c)``; ``loss = 0.5 * mean(max((V - R)^2, (V_clip - R)^2))``.
    Taking the max makes the clip pessimistic: a value moving more than ``c`` from ``V_old`` gets no
    gradient when that move reduces the error, and the full gradient when it increases it.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        old_values: ``(B, T)`` value predictions at rollout time (no grad).
        returns: ``(B, T)`` value targets, e.g. from :func:`rlhfkit.core.gae.gae_advantages`.
        mask: ``(B, T)`` bool or numeric, nonzero on real response tokens; NaN/inf elsewhere is ignored.
        value_clip: ``c >= 0``; ``None`` disables clipping (plain ``0.5 * MSE``).
        aggregation: a key of :data:`LOSS_AGGREGATIONS` (``"token-mean"`` is the formula above).
        max_tokens: the generation length limit; required by ``"seq-mean-token-sum-norm"``, ignored by
            the other aggregations (see :func:`aggregate_loss`).
        normaliser: units to divide by (see :func:`aggregate_loss`); default this batch's own.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor; ``metrics`` holds detached 0-dim tensors
        ``ppo/value_clipfrac`` (fraction of real tokens where the clipped error was strictly larger),
        ``loss/value`` (the loss) and ``ppo/value_mean`` (mean of ``values`` over real tokens).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if value_clip is not None and not value_clip >= 0:
        raise ValueError(f"value_clip must be >= 0 or None, got {value_clip}")
    keep = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.promote_types(torch.promote_types(values.dtype, old_values.dtype), returns.dtype)
    clean = _cleaner(keep, dtype)
    values, old_values, returns = clean(values), clean(old_values), clean(returns)

    vf_unclipped = (values - returns).square()
    if value_clip is None:
        token_losses, clipped = vf_unclipped, torch.zeros_like(keep)
    else:
        # clamp(V, V_old - c, V_old + c), not V_old + clamp(V - V_old, -c, c): the two are equal in exact
        # arithmetic, but the second rounds V - V_old and adds it back, so an unclipped V can come back one ulp
        # off and the strict `>` below would count it as clipped (e.g. fp32 V 0.21, V_old 0.04, R 1.84, c 0.5).
        values_clipped = values.clamp(old_values - value_clip, old_values + value_clip)
        vf_clipped = (values_clipped - returns).square()
        token_losses, clipped = torch.maximum(vf_unclipped, vf_clipped), vf_clipped > vf_unclipped
    loss = 0.5 * aggregate_loss(token_losses, keep, aggregation, max_tokens, normaliser)

    with torch.no_grad():
        metrics = {
            "ppo/value_clipfrac": masked_mean(clipped.to(dtype), keep),
            "loss/value": loss,
            "ppo/value_mean": masked_mean(values, keep),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much of the variance of the returns the value function explains, over real tokens.

    ``1 - Var[R - V] / Var[R]``: 1 for a perfect value function, 0 for one no better than the mean
    return, negative for a worse one. When ``Var[R] = 0`` (a constant target, e.g. one real token or
    identical returns) the ratio is undefined; this returns 0 there instead of TRL's NaN/inf, so a
    logged curve or an average of this metric is never poisoned by one degenerate batch.

    Args:
        values: ``(B, T)`` value predictions.
        returns: ``(B, T)`` value targets.
        mask: ``(B, T)`` bool or numeric, nonzero on real tokens; NaN/inf elsewhere is ignored.

    Returns:
        Detached 0-dim tensor.
    """
    _check_same_shape(values=values, returns=returns, mask=mask)
    keep = mask if mask.dtype == torch.bool else mask != 0
    with torch.no_grad():
        clean = _cleaner(keep, torch.promote_types(values.dtype, returns.dtype))
        values, returns = clean(values), clean(returns)
        # Biased variances: the Bessel factors of the two cancel in the ratio anyway.
        var_returns = masked_var(returns, keep, unbiased=False)
        var_residual = masked_var(returns - values, keep, unbiased=False)
        safe_var = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
        explained = torch.where(var_returns > 0, 1 - var_residual / safe_var, torch.zeros_like(var_returns))
    return explained.detach()
