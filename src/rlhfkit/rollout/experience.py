"""One rollout and everything scored on it, as it travels from sampling to the update (OpenRLHF's `Experience`).

B samples; R is the response width of `batch` (per-token tensors are aligned with `batch.response_mask`).
A field an algorithm does not use stays None: GRPO with one on-policy step needs no old log-probs, beta 0 no
reference, and only PPO has values and returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfkit.rollout.batch import RolloutBatch


@dataclass
class Experience:
    batch: RolloutBatch                         # prompts (left-padded) and responses (right-padded), (B, P + R)
    records: list[dict]                         # (B) the prompt record each sample answers
    texts: list[str]                            # (B) the decoded responses
    scores: torch.Tensor                        # (B,) reward: reward model and/or functions, weighted
    logprobs: torch.Tensor | None = None        # (B, R) policy log-probs at rollout time (the ratio's old)
    ref_logprobs: torch.Tensor | None = None    # (B, R) frozen reference's log-probs
    values: torch.Tensor | None = None          # (B, R) critic values at rollout time (PPO)
    reward_parts: torch.Tensor | None = None    # (S, B) each reward source's score, before weighting
    advantages: torch.Tensor | None = None      # (B, R) per token (PPO) or (B,) per sample (GRPO, RLOO)
    returns: torch.Tensor | None = None         # (B, R) value targets (PPO)
    loss_mask: torch.Tensor | None = None       # (B, R) tokens that carry loss; default the response mask
    timings: dict[str, float] = field(default_factory=dict)  # time/rollout_s, score_s, train_s, step_s

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def mask(self) -> torch.Tensor:
        """(B, R) float: 1 on the tokens that carry loss."""
        return self.batch.response_mask if self.loss_mask is None else self.loss_mask
