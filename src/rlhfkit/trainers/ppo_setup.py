"""Building what a PPO run needs: prompts, the four models (policy, reference, critic, reward) and optimizers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.data.text import prompt_text
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.errors import UserError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.precision import store_linears_in_bf16
from rlhfkit.models.reward_model import load_reward_model
from rlhfkit.rollout.scoring import RewardScorer
from rlhfkit.trainers.optim import build_optimizer, build_scheduler
from rlhfkit.trainers.output_dir import save_hf_folder
from rlhfkit.trainers.stage_data import prompt_records


class PromptsAndGold:
    """Shared by the models of the sampling trainers (fields `tokenizer`, `gold`, `config`): prompt token ids
    and gold scores of samples, for logging only."""

    def encode_prompts(self, records: list[dict]) -> list[list[int]]:
        c = self.config
        return [tokenize_prompt(self.tokenizer, r["prompt"], c.max_prompt_length, c.use_chat_template) for r in records]

    def gold_scores(self, records: list[dict], texts: list[str]) -> list[float]:
        return self.gold([prompt_text(r["prompt"]) for r in records], texts)


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


def load_prompts_for(config) -> list[dict]:
    records = prompt_records(config.data, "train")
    if not records:
        raise UserError("no prompts to train on")
    return records


def load_ppo_models(config: PPOConfig) -> PPOModels:
    if not config.reward_model:
        raise UserError("--reward-model is required: a folder written by `rlhfkit reward`")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    policy = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation)
    ref = load_causal_lm(config.ref_model or config.model, config.dtype, config.trust_remote_code,
                         config.attn_implementation)
    ref.requires_grad_(False).eval()
    reward_tokenizer = load_tokenizer(config.reward_model, config.trust_remote_code)
    reward_model = load_reward_model(config.reward_model, reward_tokenizer.pad_token_id, config.dtype,
                                     config.trust_remote_code, config.attn_implementation)
    reward_model.requires_grad_(False).eval()
    scorer = RewardScorer(reward_model, reward_tokenizer, tokenizer, config.max_prompt_length, config.use_chat_template)
    if config.critic_init == "reward" and not scorer.reuse_ids:
        raise UserError(f"{config.reward_model}: the reward model has its own tokenizer, so it cannot start the "
                        f"critic (which reads the policy's tokens); use --critic-init policy")
    critic_from = config.reward_model if config.critic_init == "reward" else config.model
    critic = load_reward_model(critic_from, tokenizer.pad_token_id, config.dtype, config.trust_remote_code,
                               config.attn_implementation)
    if config.mixed_precision == "bf16":  # the frozen models run only under autocast (rollout_and_score)
        store_linears_in_bf16(ref)
        store_linears_in_bf16(reward_model)
    gold = None
    if config.gold_scorer:
        from rlhfkit.annotate.gold import load_gold_scorer

        gold = load_gold_scorer(config.gold_scorer)
    return PPOModels(policy, ref, critic, scorer, tokenizer, gold, config)


def build_optimizers(models: PPOModels, config: PPOConfig) -> dict:
    """AdamW and a schedule for the policy and for the critic (separate learning rates, separate clipping)."""
    steps = config.max_steps * config.ppo_epochs * (config.rollout_batch_size // config.mini_batch_size)
    out = {}
    for name, model, lr in (("policy", models.policy, config.learning_rate),
                            ("critic", models.critic, config.critic_learning_rate)):
        optimizer = build_optimizer(model, config, lr=lr)
        out[f"{name}_optimizer"] = optimizer
        out[f"{name}_scheduler"] = build_scheduler(optimizer, config, steps)
    return out
