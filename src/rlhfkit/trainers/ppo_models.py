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
from rlhfkit.models import lora
from rlhfkit.models.roles import Role
from rlhfkit.models.trained import base_path, load_trained_weights, save_trained, uses_lora, with_lora
from rlhfkit.trainers.rl_models import PromptsAndGold, load_gold, load_reference, load_reward_scorer


@dataclass
class PPOModels(PromptsAndGold):
    policy: torch.nn.Module        # trained (the actor); with LoRA, the shared base through adapter "policy"
    ref: torch.nn.Module           # frozen copy of the starting policy; with LoRA, the base with adapters off
    critic: torch.nn.Module        # trained value model (trunk + scalar head); with LoRA, adapter "critic" + head
    reward: RewardScorer           # frozen reward model
    tokenizer: object
    gold: Callable | None          # optional gold scorer, for logging only
    config: PPOConfig


    def save(self, folder: Path, states: dict | None = None) -> None:
        """The policy as a standard HF folder (LoRA: a peft adapter folder); the critic beside it in `critic/`.
        `states`: role -> the whole weights to write (FSDP, gathered: models.parallel.TrainedRoles)."""
        states = states or {}
        save_trained(self.policy, self.tokenizer, folder, base_path(self.config), states.get("policy"))
        save_trained(self.critic, self.tokenizer, Path(folder) / "critic", base_path(self.config),
                     states.get("critic"))

    def load(self, folder: Path) -> None:
        load_trained_weights(self.policy, folder)
        load_trained_weights(self.critic, Path(folder) / "critic")


def load_ppo_models(config: PPOConfig) -> PPOModels:
    if not config.reward_model:
        raise UserError("--reward-model is required: a folder written by `rlhfkit reward`")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    if uses_lora(config):
        policy, ref, critic = lora_roles(config)
        scorer = shared_reward_scorer(config, policy.shared_base, tokenizer) or load_reward_scorer(config, tokenizer)
    else:
        policy, ref, critic, scorer = full_models(config, tokenizer)
    gold = load_gold(config)
    return PPOModels(policy, ref, critic, scorer, tokenizer, gold, config)


def full_models(config: PPOConfig, tokenizer):
    """Three models and the reward model: the policy, a frozen reference, and a critic started from the reward
    model or the policy (loaded in this order: a fresh critic head is drawn from the RNG after the others)."""
    policy = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation,
                            config.device)
    ref = load_reference(config)
    scorer = load_reward_scorer(config, tokenizer)
    if config.critic_init == "reward" and not scorer.reuse_ids:
        raise UserError(f"{config.reward_model}: the reward model has its own tokenizer, so it cannot start the "
                        f"critic (which reads the policy's tokens); use --critic-init policy")
    critic_from = config.reward_model if config.critic_init == "reward" else config.model
    critic = load_reward_model(critic_from, tokenizer.pad_token_id, config.dtype, config.trust_remote_code,
                               config.attn_implementation, config.device)
    for trained in (policy, critic):
        set_gradient_checkpointing(trained, config.gradient_checkpointing)
    return policy, ref, critic, scorer


def lora_roles(config: PPOConfig):
    """One frozen base for three roles: the policy (adapter "policy"), the reference (adapters off, so exactly
    the starting weights: a LoRA-trained SFT folder is merged into the base on load) and the critic (adapter
    "critic" plus a value head). With `critic_init: reward` and a reward model trained with LoRA on this same
    base, the critic starts as that reward model (its adapter and score head, trained from there on), as a full
    critic starts as a copy of the reward model; otherwise its adapter is fresh and its head is initialised like
    transformers' scalar heads."""
    if config.ref_model and config.ref_model != config.model:
        raise UserError("--ref-model: with LoRA the reference is the policy's base with its adapter off; "
                        "drop --ref-model, or train in full (--lora-r 0)")
    base = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation,
                          config.device)
    with_lora(base, config, "policy")
    weight = base.get_input_embeddings().weight
    if config.critic_init == "reward" and reward_shares_base(config):
        extra = lora.attach_adapter_folder(base, config.reward_model, "critic", trainable=True)
        head = torch.nn.Linear(base.config.hidden_size, 1, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(extra["score.weight"])
    else:
        with_lora(base, config, "critic")
        # Drawn on the CPU and then moved, so that a seed gives the same head on every device.
        head = torch.nn.Linear(base.config.hidden_size, 1, bias=False, dtype=weight.dtype)
        torch.nn.init.normal_(head.weight, std=getattr(base.config, "initializer_range", 0.02))
        if config.critic_init == "reward":
            print(f"critic: a fresh adapter and value head on the policy's base ({config.reward_model} was not "
                  f"trained with LoRA on it, so the critic cannot start as the reward model)")
    head.to(weight.device)
    set_gradient_checkpointing(base, config.gradient_checkpointing)
    return Role(base, "policy"), Role(base, None), Role(base, "critic", score=head)


def reward_shares_base(config: PPOConfig) -> bool:
    """Whether the reward model is a LoRA adapter trained on the policy's own base (`config.model`)."""
    return (lora.is_adapter_folder(config.reward_model)
            and str(Path(lora.adapter_base(config.reward_model)).resolve()) == base_path(config))


def shared_reward_scorer(config: PPOConfig, base, tokenizer) -> RewardScorer | None:
    """A reward model trained with LoRA on the policy's own base scores on that base: a third, frozen adapter
    "reward" plus its score head. None when the reward model is a full model or has another base."""
    if not reward_shares_base(config):
        return None
    extra = lora.attach_adapter_folder(base, config.reward_model, "reward")
    weight = base.get_input_embeddings().weight
    head = torch.nn.Linear(base.config.hidden_size, 1, bias=False, dtype=weight.dtype, device=weight.device)
    head.load_state_dict({"weight": extra["score.weight"]})
    head.requires_grad_(False)
    role = Role(base, "reward", score=head).eval()
    return RewardScorer(role, tokenizer, tokenizer, config.max_prompt_length, config.use_chat_template,
                        config.system_prompt)


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
