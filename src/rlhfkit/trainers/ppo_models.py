"""Building what a PPO run needs: the four models (policy, reference, critic, reward) and optimizers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer, set_gradient_checkpointing
from rlhfkit.models.reward_model import load_reward_model
from rlhfkit.rollout.scoring import RewardScorer
from rlhfkit.trainers.optim import build_optimizer, build_scheduler
from rlhfkit.runtime.output_dir import save_hf_folder
from rlhfkit.trainers.rl_models import PromptsAndGold, load_gold, load_reference, load_reward_scorer


@dataclass
class PPOModels(PromptsAndGold):
    policy: torch.nn.Module        # trained (the actor)
    ref: torch.nn.Module           # frozen copy of the starting policy
    critic: torch.nn.Module        # trained value model (trunk + scalar head)
    reward: RewardScorer           # frozen reward model
    tokenizer: object
    gold: Callable | None          # optional gold scorer, for logging only
    config: PPOConfig


    def save(self, folder: Path) -> None:
        """The policy as a standard HF folder; the critic beside it in `critic/` (a reward-model folder)."""
        save_hf_folder(self.policy, self.tokenizer, folder)
        save_hf_folder(self.critic, self.tokenizer, Path(folder) / "critic")


def load_ppo_models(config: PPOConfig) -> PPOModels:
    if not config.reward_model:
        raise UserError("--reward-model is required: a folder written by `rlhfkit reward`")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    policy = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation)
    ref = load_reference(config)
    scorer = load_reward_scorer(config, tokenizer)
    if config.critic_init == "reward" and not scorer.reuse_ids:
        raise UserError(f"{config.reward_model}: the reward model has its own tokenizer, so it cannot start the "
                        f"critic (which reads the policy's tokens); use --critic-init policy")
    critic_from = config.reward_model if config.critic_init == "reward" else config.model
    critic = load_reward_model(critic_from, tokenizer.pad_token_id, config.dtype, config.trust_remote_code,
                               config.attn_implementation)
    for trained in (policy, critic):
        set_gradient_checkpointing(trained, config.gradient_checkpointing)
    gold = load_gold(config)
    return PPOModels(policy, ref, critic, scorer, tokenizer, gold, config)


def build_optimizers(models: PPOModels, config: PPOConfig) -> tuple[dict, dict]:
    """AdamW and a schedule for the policy and for the critic (separate learning rates, separate clipping):
    ({name: optimizer}, {name: scheduler})."""
    steps = config.max_steps * config.ppo_epochs * (config.rollout_batch_size // config.mini_batch_size)
    optimizers, schedulers = {}, {}
    for name, model, lr in (("policy", models.policy, config.learning_rate),
                            ("critic", models.critic, config.critic_learning_rate)):
        optimizers[name] = build_optimizer(model, config, lr=lr)
        schedulers[name] = build_scheduler(optimizers[name], config, steps)
    return optimizers, schedulers
