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

Where both models' full next-token distributions are at hand (the evaluation scores every response position
with both), the per-token KL need not be estimated: :func:`exact_token_kl` sums over the vocabulary,

    KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)) >= 0       (Cover & Thomas, "Elements of Information
                                                              Theory", 2nd ed., eq. 2.26 and thm. 2.6.3)

and :func:`exact_sequence_kl` adds it over a response. By the chain rule of the KL (ibid., thm. 2.5.3), the
expectation over responses y ~ pi of sum_t KL_t is the sequence-level KL(pi || pi_ref), the same quantity that
the summed k1 estimates; it is never negative and has a smaller variance (only the path y is random).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["KL_ESTIMATORS", "exact_sequence_kl", "exact_token_kl", "kl_penalty"]

# Upper bound on the elements of one chunk of positions x vocabulary in exact_sequence_kl (2**22 float32 = 16 MiB per
# temporary): rows per chunk = this // V. A module constant so that tests can shrink it to exercise several chunks.
_CHUNK_ELEMENTS = 2**22


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


def exact_token_kl(policy: torch.Tensor, ref: torch.Tensor, temperature: float = 1.0,
                   logprobs: bool = False) -> torch.Tensor:
    """Exact ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` at each position, over the whole vocabulary.

    Args:
        policy, ref: ``(..., V)`` logits (or, with ``logprobs=True``, normalised log-probs) of the policy and the
            reference at the same positions. Computed in float32 (float64 stays float64).
        temperature: > 0; both distributions are ``softmax(logits / temperature)``, the distributions the
            samples are drawn from and scored at (``rollout.scoring.response_logprobs`` divides the same way).
            Ignored with ``logprobs=True``: log-probs already are at their temperature. With ``top_p < 1`` the
            sampler draws from a truncated distribution; this is the KL of the untruncated ones.
        logprobs: the inputs already are ``log_softmax(logits / temperature)``; skips the normalisation.

    Returns:
        ``(...)`` per-position KL in nats, >= 0 (a rounding error below 0 is clamped to 0); +inf where the
        reference gives probability 0 to a token the policy can draw.
    """
    if policy.shape != ref.shape:
        raise ValueError(f"policy {tuple(policy.shape)} and ref {tuple(ref.shape)} shapes differ")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if policy.dtype == torch.float64 else torch.float32
    logp, logq = policy.to(dtype), ref.to(dtype)
    if not logprobs:
        logp = torch.log_softmax(logp / temperature, dim=-1)
        logq = torch.log_softmax(logq / temperature, dim=-1)
    terms = (logp - logq).mul_(logp.exp())
    # p log(p / q) is 0 where p = 0, but 0 * (-inf) there comes out NaN: set it to 0. Where p > 0 and q = 0 the
    # term is +inf, and stays so.
    terms.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return terms.sum(dim=-1).clamp_min(0.0)


def exact_sequence_kl(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      logprobs: bool = False) -> torch.Tensor:
    """Exact KL of each response: ``sum_t mask[b, t] * sum_v p_bt(v) log(p_bt(v) / q_bt(v))``.

    Args:
        policy, ref: ``(B, T, V)`` logits (or normalised log-probs, ``logprobs=True``) predicting each response
            token, from the policy and the reference; ``V`` may be a 49k-150k vocabulary.
        mask: ``(B, T)`` 1 at the response's real tokens, 0 at padding; masked positions are never read into the
            sum (their logits may be garbage, even NaN).
        temperature: as in :func:`exact_token_kl`.

    Returns:
        ``(B,)`` summed KL per response, nats, >= 0, in float32 (float64 for float64 inputs).

    Only the masked positions are computed, a chunk of rows at a time (``_CHUNK_ELEMENTS // V`` rows), so the
    temporaries of the softmax are one chunk, never another ``(B, T, V)`` tensor.
    """
    if policy.dim() != 3 or policy.shape != ref.shape or mask.shape != policy.shape[:2]:
        raise ValueError(f"expected (B, T, V) policy and ref and a (B, T) mask, got {tuple(policy.shape)}, "
                         f"{tuple(ref.shape)} and {tuple(mask.shape)}")
    B, T, V = policy.shape
    dtype = torch.float64 if policy.dtype == torch.float64 else torch.float32
    flat_p, flat_q = policy.reshape(B * T, V), ref.reshape(B * T, V)
    positions = mask.reshape(-1).bool().nonzero().squeeze(1)  # (N,) flat indices of the real tokens
    total = torch.zeros(B, dtype=dtype, device=policy.device)
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, positions.numel(), step):
        rows = positions[start:start + step]
        kl = exact_token_kl(flat_p.index_select(0, rows), flat_q.index_select(0, rows), temperature, logprobs)
        total.index_add_(0, torch.div(rows, T, rounding_mode="floor"), kl)
    return total
