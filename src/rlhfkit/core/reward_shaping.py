"""Per-token PPO rewards: a KL penalty on every token plus the reward-model score on the last one.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", eq. 2) and Stiennon et al.
2020 ("Learning to summarize from human feedback", eq. 1) optimise

    R(x, y) = r_theta(x, y) - beta * log(pi(y | x) / pi_ref(y | x)),

and InstructGPT (Ouyang et al. 2022, "Training language models to follow instructions with human
feedback", eq. 2) keeps the same per-token KL term. The log ratio of the whole response is the sum of the
per-token log ratios, so the KL part becomes a dense per-token reward ``-beta * kl_t``, while the
sequence score ``r_theta`` is a sparse reward paid at the last response token, where the episode ends:

    rewards[b, t] = -beta * kl[b, t] + [t == last real token of row b] * score'[b].

``score'`` is the reward-model score after the optional processing below (EOS penalty, scale, clip).
"""

from __future__ import annotations

import torch

from .masked import masked_sum
from .positions import last_token_index

__all__ = ["shape_rewards"]


def _process_scores(
    scores: torch.Tensor,
    ended: torch.Tensor | None,
    missing_eos_penalty: float | None,
    reward_clip: float | None,
    reward_scale: float,
) -> torch.Tensor:
    """Penalise rows without EOS, then scale, then clip (the order is part of the contract)."""
    if missing_eos_penalty is not None:
        # TRL's missing_eos_penalty: a truncated response is not a finished answer, so its score is
        # lowered rather than trusted (reward models often score half-sentences well).
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    scores = scores * reward_scale
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def shape_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    ended: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
    reward_clip: float | None = None,
    reward_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense per-token rewards ``-kl_coef * kl`` plus each row's processed score on its last real token.

    Args:
        scores: ``(B,)`` reward-model scores of the responses.
        kl: ``(B, T)`` per-token KL estimates (e.g. :func:`rlhfkit.core.kl.kl_penalty`). Entries where
            ``mask`` is 0 may be garbage (NaN/inf) and change nothing.
        mask: ``(B, T)`` bool or numeric, nonzero on real response tokens. The score goes on the *last*
            nonzero position of each row, so rows may end at different lengths. A row with no real
            token receives no reward at all (its score is dropped).
        kl_coef: ``beta`` (a float, e.g. a KL controller's ``.value``, or a 0-dim tensor).
        ended: ``(B,)`` bool, True where the response ended with EOS (not cut off at the length limit).
            Required when ``missing_eos_penalty`` is given.
        missing_eos_penalty: subtracted from the score of every row with ``ended == False`` (as TRL's
            ``missing_eos_penalty``). ``None`` disables it.
        reward_clip: after the penalty and the scale, scores are clamped to ``[-reward_clip, reward_clip]``
            (OpenRLHF's ``reward_clip_range``); ``None`` disables it.
        reward_scale: multiplies the (penalised) score.

    Returns:
        ``(rewards, metrics)``: ``rewards`` is ``(B, T)``, exactly 0 where ``mask`` is 0. ``metrics``
        holds detached 0-dim tensors, each a mean over the ``B`` rows of a per-row quantity:
        ``objective/kl`` (summed per-token ``kl``), ``objective/scores`` (raw ``scores``),
        ``objective/non_score_reward`` (summed ``-kl_coef * kl``) and ``objective/rlhf_reward``
        (summed ``rewards``, i.e. processed score + non-score reward; a row with no real token
        counts 0).
    """
    if kl.dim() != 2 or kl.shape != mask.shape:
        raise ValueError(f"kl {tuple(kl.shape)} and mask {tuple(mask.shape)} must be the same (B, T)")
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores shape {tuple(scores.shape)} must be (B,) = {tuple(kl.shape[:1])}")
    if missing_eos_penalty is not None:
        if ended is None:
            # Silently skipping a configured penalty would train on truncated answers unpenalised.
            raise ValueError("missing_eos_penalty needs `ended`, the (B,) bool 'response ended with EOS'")
        if ended.shape != scores.shape:
            raise ValueError(f"ended shape {tuple(ended.shape)} must equal scores' {tuple(scores.shape)}")
        ended = ended if ended.dtype == torch.bool else ended != 0
    if reward_clip is not None and not reward_clip > 0:
        raise ValueError(f"reward_clip must be > 0 or None, got {reward_clip}")

    keep = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    # where, not multiply: kl after the end may be NaN and 0 * NaN is NaN.
    non_score = torch.where(keep, -kl_coef * torch.where(keep, kl, zero), zero)

    processed = _process_scores(scores, ended, missing_eos_penalty, reward_clip, reward_scale)
    positions = torch.arange(kl.shape[1], device=kl.device)
    # last_token_index maps an empty row to 0, where keep is False: such a row gets no score.
    is_last = keep & (positions == last_token_index(keep).unsqueeze(1))
    no_score = torch.zeros((), dtype=processed.dtype, device=processed.device)
    score_reward = torch.where(is_last, processed.unsqueeze(1), no_score)
    rewards = non_score + score_reward

    with torch.no_grad():
        metrics = {
            "objective/kl": masked_sum(kl, keep, dim=1).mean(),
            "objective/scores": scores.mean(),
            "objective/non_score_reward": non_score.sum(dim=1).mean(),
            "objective/rlhf_reward": rewards.sum(dim=1).mean(),
        }
    return rewards, {name: value.detach() for name, value in metrics.items()}
