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
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.precision import store_linears_in_bf16
from rlhfkit.models.reward_model import load_reward_model
from rlhfkit.rollout.batch import RolloutBatch
from rlhfkit.rollout.reward_functions import RewardFunction, parse_reward_functions, parse_weights
from rlhfkit.rollout.scoring import RewardScorer
from rlhfkit.trainers.output_dir import save_hf_folder
from rlhfkit.trainers.ppo_setup import PromptsAndGold
from rlhfkit.trainers.stage_data import embedded_prompts


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
    policy: torch.nn.Module        # trained
    ref: torch.nn.Module | None    # frozen copy of the starting policy; None when beta == 0
    rewards: RewardSources
    tokenizer: object
    gold: Callable | None          # optional gold scorer, for logging only
    config: GRPOConfig

    def save(self, folder: Path) -> None:
        """The policy as a standard HF folder (there is no critic)."""
        save_hf_folder(self.policy, self.tokenizer, folder)


def load_group_prompts(config: GRPOConfig) -> list[dict]:
    """Prompt records; with --data, each record keeps its other fields for the reward functions."""
    if config.data:
        from rlhfkit.data.loading import load_records

        records = load_records(config.data, "prompt", keep_extra=True)
    else:
        records = embedded_prompts("train")
    if not records:
        raise UserError("no prompts to train on")
    return records


def load_reward_sources(config: GRPOConfig, policy_tokenizer) -> RewardSources:
    if not config.reward_model and not config.reward_function:
        raise UserError("a reward is required: --reward-model (a folder written by `rlhfkit reward`) and/or "
                        "--reward-function module:function")
    functions = parse_reward_functions(config.reward_function)  # imported first: a bad one fails before any load
    names = (["reward_model"] if config.reward_model else []) + [f.name for f in functions]
    weights = parse_weights(config.reward_weights, len(names), names)
    scorer = None
    if config.reward_model:
        reward_tokenizer = load_tokenizer(config.reward_model, config.trust_remote_code)
        reward_model = load_reward_model(config.reward_model, reward_tokenizer.pad_token_id, config.dtype,
                                         config.trust_remote_code, config.attn_implementation)
        reward_model.requires_grad_(False).eval()
        if config.mixed_precision == "bf16":  # it only runs under autocast (rollout_and_score)
            store_linears_in_bf16(reward_model)
        scorer = RewardScorer(reward_model, reward_tokenizer, policy_tokenizer, config.max_prompt_length,
                              config.use_chat_template)
    return RewardSources(scorer, functions, weights)


def load_group_models(config: GRPOConfig) -> GroupModels:
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    rewards = load_reward_sources(config, tokenizer)
    policy = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation)
    ref = None
    if config.beta > 0:  # beta == 0: no reference at all (one model's memory saved)
        ref = load_causal_lm(config.ref_model or config.model, config.dtype, config.trust_remote_code,
                             config.attn_implementation)
        ref.requires_grad_(False).eval()
        if config.mixed_precision == "bf16":
            store_linears_in_bf16(ref)
    gold = None
    if config.gold_scorer:
        from rlhfkit.annotate.gold import load_gold_scorer

        gold = load_gold_scorer(config.gold_scorer)
    return GroupModels(policy, ref, rewards, tokenizer, gold, config)
