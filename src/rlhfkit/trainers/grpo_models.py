"""Building what a GRPO/RLOO run needs: prompts, the policy, the reference (only when beta > 0) and the rewards.

Rewards are a weighted sum of sources: a reward model (as in PPO) and/or Python functions 'module:function'.
Everything that can be checked before the run (imports, weights, model folders) is checked here, before the
output folder exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.config import GRPOConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer, set_gradient_checkpointing
from rlhfkit.rollout.batch import RolloutBatch
from rlhfkit.rollout.reward_functions import RewardFunction, parse_reward_functions, parse_weights
from rlhfkit.rollout.scoring import RewardScorer
from rlhfkit.models.roles import Role
from rlhfkit.models.trained import base_path, load_trained_weights, save_trained, uses_lora, with_lora
from rlhfkit.trainers.rl_models import PromptsAndGold, load_gold, load_reference, load_reward_scorer


@dataclass
class RewardSources:
    """reward = sum_j weight_j * source_j: the reward model (first, if any), then the functions."""

    model: RewardScorer | None
    functions: list[RewardFunction]
    weights: list[float]

    @property
    def names(self) -> list[str]:
        return (["reward_model"] if self.model is not None else []) + [f.name for f in self.functions]

    def function_rewards(self, records: list[dict], texts: list[str], batch: RolloutBatch) -> torch.Tensor:
        """(F, B) rewards of the functions for B completions of `records` (one record per completion)."""
        if not self.functions:
            return torch.zeros(0, len(texts))
        prompts = [r["prompt"] for r in records]
        # TRL's convention: a conversational prompt gets its completion as a list with one assistant message.
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        lengths = batch.response_mask.sum(1).long().tolist()
        extra = {"completion_ids": [row[:n] for row, n in zip(batch.responses.tolist(), lengths)]}
        for key in records[0]:
            if key != "prompt":
                extra[key] = [r.get(key) for r in records]
        return torch.tensor([f(prompts, completions, **extra) for f in self.functions], dtype=torch.float32)


@dataclass
class GroupModels(PromptsAndGold):
    policy: torch.nn.Module        # trained; with LoRA, the base through adapter "policy"
    ref: torch.nn.Module | None    # frozen copy of the starting policy (LoRA: the base, adapter off); None if beta == 0
    rewards: RewardSources
    tokenizer: object
    gold: Callable | None          # optional gold scorer, for logging only
    config: GRPOConfig

    def save(self, folder: Path, states: dict | None = None) -> None:
        """The policy as a standard HF folder, or a peft adapter folder with LoRA (there is no critic).
        `states`: role -> the whole weights to write (FSDP, gathered: models.parallel.TrainedRoles)."""
        save_trained(self.policy, self.tokenizer, folder, base_path(self.config), (states or {}).get("policy"))

    def load(self, folder: Path) -> None:
        load_trained_weights(self.policy, folder)


def load_reward_sources(config: GRPOConfig, policy_tokenizer) -> RewardSources:
    if not config.reward_model and not config.reward_function:
        raise UserError("a reward is required: --reward-model (a folder written by `rlhfkit reward`) and/or "
                        "--reward-function module:function")
    functions = parse_reward_functions(config.reward_function)  # imported first: a bad one fails before any load
    names = (["reward_model"] if config.reward_model else []) + [f.name for f in functions]
    weights = parse_weights(config.reward_weights, len(names), names)
    scorer = load_reward_scorer(config, policy_tokenizer) if config.reward_model else None
    return RewardSources(scorer, functions, weights)


def load_group_models(config: GRPOConfig) -> GroupModels:
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    rewards = load_reward_sources(config, tokenizer)
    policy = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation,
                            config.device)
    set_gradient_checkpointing(policy, config.gradient_checkpointing)
    if uses_lora(config):  # one base: the reference is the policy with its adapter off
        if config.ref_model and config.ref_model != config.model:
            raise UserError("--ref-model: with LoRA the reference is the policy's base with its adapter off; "
                            "drop --ref-model, or train in full (--lora-r 0)")
        base = with_lora(policy, config, "policy")
        policy, ref = Role(base, "policy"), (Role(base, None) if config.beta > 0 else None)
    else:
        ref = load_reference(config) if config.beta > 0 else None  # beta == 0: no reference at all (memory)
    gold = load_gold(config)
    return GroupModels(policy, ref, rewards, tokenizer, gold, config)
