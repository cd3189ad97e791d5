"""Per-token estimates of KL(policy || reference) from tokens sampled from the policy.

RLHF penalises the policy for drifting from the reference (SFT) model with ``beta * KL(pi || pi_ref)``
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Stiennon et al. 2020,
"Learning to summarize from human feedback"). The exact KL needs a sum over the vocabulary at every
position; with only the log-probs of the sampled tokens, ``logp = log pi(x)`` and ``logq = log
pi_ref(x)`` for ``x ~ pi``, Schulman (2020, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html) gives three Monte Carlo estimators. With ``r = q(x) / p(x)``,
i.e. ``log r = logq - logp``:

    k1 = -log r = logp - logq                    unbiased, high variance, negative on some samples
    k2 = 0.5 * (log r)^2                         biased (exact to second order), low variance, >= 0
    k3 = (r - 1) - log r                         unbiased and >= 0 (log r <= r - 1), low variance

``k3`` is unbiased because ``E_p[r - 1] = sum_x q(x) - 1 = 0``. ``abs = |logp - logq|`` is also offered,
as OpenRLHF and TRL do; it is a biased, non-negative penalty rather than an estimator of the KL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["KL_ESTIMATORS", "kl_penalty"]


def _k1(log_ratio: torch.Tensor, max_log_ratio: float | None) -> torch.Tensor:
    # A polynomial of the log ratio: cannot overflow, so it is never clamped (that would only bias it).
    return log_ratio


def _k2(log_ratio: torch.Tensor, max_log_ratio: float | None) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor, max_log_ratio: float | None) -> torch.Tensor:
    if max_log_ratio is not None:
        # exp(-log_ratio) overflows float32 past 88 (float16 past 11). Clamp the log ratio itself, not
        # just the exponent, so the result stays the k3 of *some* ratio and hence stays >= 0.
        log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    log_r = -log_ratio  # log(q / p)
    # expm1 is exact for small |log r|, where exp(log r) - 1 would cancel catastrophically.
    return torch.expm1(log_r) - log_r


def _abs(log_ratio: torch.Tensor, max_log_ratio: float | None) -> torch.Tensor:
    return log_ratio.abs()


# Name -> estimator. Each takes the log ratio ``logp - logq`` (any shape) and the clamp bound, which only
# k3 (the one with an exp) uses.
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, float | None], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "abs": _abs,
}


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    max_log_ratio: float | None = 20.0,
) -> torch.Tensor:
    """Per-token estimate of ``KL(policy || ref)`` from tokens sampled from the policy.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy that sampled them.
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference model.
        estimator: a key of :data:`KL_ESTIMATORS`: ``"k1"`` (``logp - logq``, the one of Ziegler et al.
            and TRL's default), ``"k2"``, ``"k3"`` or ``"abs"``; see the module docstring.
        max_log_ratio: for ``"k3"`` only, the log ratio is clamped to ``[-max_log_ratio, max_log_ratio]``
            before the ``exp`` so that it cannot overflow to inf (``exp(20)`` is about ``5e8``; a token
            that much likelier under one model than the other is already a saturated penalty). Beyond
            the bound the gradient w.r.t. the log-probs is 0. ``None`` disables the clamp. The other
            estimators have no ``exp`` and are never clamped.

    Returns:
        ``(B, T)`` per-token estimates, in the promoted dtype of the inputs. Positions after the end of a
        response hold whatever their (garbage) inputs give; mask them downstream.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} shapes differ"
        )
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    if max_log_ratio is not None and not max_log_ratio > 0:
        raise ValueError(f"max_log_ratio must be > 0 or None, got {max_log_ratio}")
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs, max_log_ratio)
