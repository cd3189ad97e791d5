"""GRPO and RLOO: critic-free policy optimisation with group-relative advantages over K samples per prompt.

One iteration (the loop is trainers/rl_loop.py; this file supplies its steps, in order):
  1. rollout  - sample K completions for each of prompts_per_step prompts (each prompt's K contiguous);
  2. score    - log-probs under the policy, then under the reference (when beta > 0), and rewards: a reward
                model and/or Python functions 'module:function', weighted and summed;
  3. baseline - one advantage per completion from its group (GROUP_ADVANTAGES: grpo, dr_grpo, rloo); RLOO
                first subtracts beta * the summed KL from the reward (kl_in_reward);
  4. update   - num_iterations passes of shuffled mini-batches: clipped surrogate with the sequence advantage
                on every token, plus beta * k3 KL to the reference in the loss (GRPO, kl_in_reward off);
  5. log      - metrics.jsonl, sample table, checkpoint.

GRPO is Shao et al. 2024 (DeepSeekMath); RLOO is Ahmadian et al. 2024 ("Back to Basics"). The two differ only
in config defaults (see config.GRPOConfig and config.RLOOConfig), so one class runs both.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhfkit.config import GRPOConfig, RLOOConfig
from rlhfkit.track.stage import tracked
from rlhfkit.core.group_advantages import GROUP_ADVANTAGES
from rlhfkit.core.grpo_loss import grpo_policy_loss
from rlhfkit.core.kl import kl_penalty
from rlhfkit.core.masked import masked_mean, masked_sum
from rlhfkit.models.roles import on_shared_base
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.scoring import response_logprobs
from rlhfkit.trainers.grpo_models import GroupModels, load_group_models
from rlhfkit.trainers.optim import build_optimizer, build_scheduler
from rlhfkit.trainers.rl_loop import MicroBatch, RLAlgorithm, run_rl


def rollout_size(config: GRPOConfig) -> int:
    return config.prompts_per_step * config.num_generations


def mini_batch_size(config: GRPOConfig) -> int:
    return config.mini_batch_size or rollout_size(config)


def single_on_policy_step(config: GRPOConfig) -> bool:
    """One optimizer step per rollout: the policy that is trained is the one that sampled, the ratio is 1."""
    return config.num_iterations == 1 and mini_batch_size(config) == rollout_size(config)


# 1-2. rollout and score ------------------------------------------------------------------------------------
@torch.no_grad()
def rollout_and_score(models: GroupModels, records: list[dict], prompt_ids: list[list[int]],
                      seeds: list[int], config: GRPOConfig) -> Experience:
    """B = len(prompt_ids) completions (each prompt repeated K times, contiguously), sampled, with the policy's
    log-probs (and a LoRA reference's, on the policy's base; models of their own and reward functions score in
    `score_frozen`)."""
    started = time.perf_counter()
    samples = sample_responses(models.policy, models.tokenizer, prompt_ids, config.max_new_tokens,
                               config.temperature, config.top_p, batch_size=len(prompt_ids),
                               precision=config.mixed_precision, seeds=seeds)
    batch = build_rollout_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                [s.ended for s in samples], models.tokenizer.pad_token_id, config.device)
    texts = [models.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    generated = time.perf_counter()
    models.policy.eval()
    B, R = batch.response_mask.shape
    # The policy's rollout log-probs are needed for the ratio (unless the one step is on-policy) and for the
    # KL to the reference; the reference's only when beta > 0.
    need_old = models.ref is not None or not single_on_policy_step(config)
    sources = models.rewards
    zeros = batch.response_mask.new_zeros  # float32, on the rollout's device
    exp = Experience(batch, records, texts, scores=zeros(B),
                     logprobs=zeros(B, R) if need_old else None,
                     ref_logprobs=zeros(B, R) if models.ref is not None else None,
                     reward_parts=zeros(len(sources.names), B))
    if config.mask_truncated_completions:  # DAPO: no loss on completions that hit max_new_tokens
        exp.loss_mask = batch.response_mask * batch.ended.unsqueeze(1).float()
    if need_old:
        for idx, sub in batch.micro_batches(torch.arange(B), scoring_micro_batch(config)):
            width = sub.response_mask.shape[1]
            exp.logprobs[idx, :width] = response_logprobs(models.policy, sub, config.temperature)[0]
            frozen_scores(models, exp, idx, sub, config, on_base=True)
    exp.timings = {"time/rollout_s": generated - started, "time/score_s": time.perf_counter() - generated}
    return exp


def scoring_micro_batch(config: GRPOConfig) -> int:
    return config.forward_batch_size or mini_batch_size(config) // config.gradient_accumulation_steps


@torch.no_grad()
def score_frozen(models: GroupModels, exp: Experience, config: GRPOConfig) -> None:
    """The reference's log-probs (beta > 0) and the rewards: the reward model's and the functions', weighted and
    summed into exp.scores."""
    batch, records, texts, sources = exp.batch, exp.records, exp.texts, models.rewards
    if models.ref is not None or sources.model is not None:
        for idx, sub in batch.micro_batches(torch.arange(len(exp)), scoring_micro_batch(config)):
            frozen_scores(models, exp, idx, sub, config, on_base=False)
    n_model = 1 if sources.model is not None else 0
    exp.reward_parts[n_model:] = sources.function_rewards(records, texts, batch).to(batch.device)
    weights = torch.tensor(sources.weights, device=batch.device)  # (S,)
    exp.scores = (weights.unsqueeze(1) * exp.reward_parts).sum(0)  # (B,)


def frozen_scores(models: GroupModels, exp: Experience, idx: torch.Tensor, sub, config: GRPOConfig,
                  on_base: bool) -> None:
    """One micro-batch's reference log-probs and reward-model scores, from the frozen models that are roles on the
    policy's base (`on_base`: LoRA, scored with the policy) or models of their own (not `on_base`)."""
    width = sub.response_mask.shape[1]
    if models.ref is not None and on_shared_base(models.ref) == on_base:
        exp.ref_logprobs[idx, :width] = response_logprobs(models.ref, sub, config.temperature)[0]
    scorer = models.rewards.model
    if scorer is not None and on_shared_base(scorer.model) == on_base:
        exp.reward_parts[0, idx] = scorer(sub, [exp.records[i]["prompt"] for i in idx.tolist()],
                                          [exp.texts[i] for i in idx.tolist()]).float()


# 3. rewards and group baselines ----------------------------------------------------------------------------
def group_rewards(exp: Experience, config: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Each completion's reward (score, EOS penalty, and for RLOO -beta * KL) and its metrics."""
    scores = exp.scores
    metrics = {"objective/scores": scores.mean(), "objective/scores_std": scores.std() if len(scores) > 1
               else torch.tensor(0.0)}
    rewards = scores.clone()
    if config.missing_eos_penalty is not None:
        rewards = rewards - config.missing_eos_penalty * (~exp.batch.ended).float()
    if exp.ref_logprobs is not None:
        mask = exp.batch.response_mask
        estimator = config.kl_estimator if config.kl_in_reward else "k3"  # the KL that is optimised
        kl = masked_sum(kl_penalty(exp.logprobs, exp.ref_logprobs, estimator), mask > 0, dim=1)  # (B,)
        metrics["objective/kl"] = kl.mean()
        if config.kl_in_reward:
            rewards = rewards - config.beta * kl
            metrics["objective/non_score_reward"] = (-config.beta * kl).mean()
    metrics["objective/rlhf_reward"] = rewards.mean()
    return rewards, metrics


def group_advantages(exp: Experience, names: list[str], config: GRPOConfig) -> dict:
    """Fills exp.advantages (B,) from each completion's group of K; returns the reward metrics."""
    rewards, metrics = group_rewards(exp, config)
    exp.advantages, group_metrics = GROUP_ADVANTAGES[config.advantage](rewards, config.num_generations)
    metrics.update(group_metrics)
    for name, part in zip(names, exp.reward_parts):
        metrics[f"rewards/{name}"] = part.mean()
    return metrics


# 4. the loss of one micro-batch ----------------------------------------------------------------------------
def micro_batch_loss(mb: MicroBatch, config: GRPOConfig) -> dict:
    """The clipped surrogate (and k3 KL) of one micro-batch, divided by the mini-batch's loss units and
    backpropagated (`mb.backprop`); its metrics."""
    sub, idx, exp = mb.sub, mb.idx, mb.exp
    width = sub.response_mask.shape[1]
    mask = exp.mask[idx, :width]  # (b, R'): the tokens that carry loss
    kl_in_loss = exp.ref_logprobs is not None and not config.kl_in_reward

    def loss_of(policy):
        # (b, R') each, fp32; the entropy is only logged, so no gradient flows back through it.
        logprobs, token_entropy = response_logprobs(policy, sub, config.temperature, with_entropy=True)
        old_logprobs = logprobs.detach() if exp.logprobs is None else exp.logprobs[idx, :width]
        loss, metrics = grpo_policy_loss(
            logprobs, old_logprobs, exp.ref_logprobs[idx, :width] if kl_in_loss else None, exp.advantages[idx],
            mask, clip_eps=config.clip_eps, beta=config.beta if kl_in_loss else 0.0,
            aggregation=config.loss_aggregation, max_tokens=config.max_new_tokens,
            clip_eps_high=config.clip_eps_high, normaliser=mb.normaliser)
        metrics.pop("ppo/dual_clipfrac", None)  # no dual clip here
        return loss, {**metrics, "ppo/entropy": masked_mean(token_entropy.detach(), mask > 0),
                      "loss/policy": loss.detach()}

    return mb.backprop("policy", loss_of)


class GroupRL(RLAlgorithm):
    """GRPO and RLOO."""

    keep_extra_fields = True  # reward functions receive the prompt records' other fields (e.g. an answer)
    prompts_field = "prompts_per_step"
    guard_hint = "check the rewards"

    def __init__(self, config: GRPOConfig):
        super().__init__(config)
        self.models = load_group_models(config)
        self.share_models({"policy": self.models.policy})
        reward_model = self.models.rewards.model
        self.share_frozen({"reference": self.models.ref,
                           "reward model": reward_model.model if reward_model is not None else None})
        steps = config.max_steps * config.num_iterations * (rollout_size(config) // mini_batch_size(config))
        self.optimizers = {"policy": build_optimizer(self.models.policy, config)}
        self.schedulers = {"policy": build_scheduler(self.optimizers["policy"], config, steps)}
        self.loss_aggregation = config.loss_aggregation

    def samples_per_prompt(self) -> int:
        return self.config.num_generations

    def mini_batch_size(self) -> int:
        return mini_batch_size(self.config)

    def epochs(self) -> int:
        return self.config.num_iterations

    def rollout(self, records, prompt_ids, seeds) -> Experience:
        return rollout_and_score(self.models, records, prompt_ids, seeds, self.config)

    def score(self, exp: Experience) -> None:
        score_frozen(self.models, exp, self.config)

    def advantages(self, exp: Experience) -> dict:
        return group_advantages(exp, self.models.rewards.names, self.config)

    def micro_batch_loss(self, mb: MicroBatch) -> dict:
        return micro_batch_loss(mb, self.config)

    def sample_rows(self, exp: Experience) -> list[dict]:
        k = self.config.num_generations  # the first completion of the first 4 prompts
        return [{"prompt": exp.records[i]["prompt"], "response": exp.texts[i], "score": float(exp.scores[i]),
                 "advantage": float(exp.advantages[i])} for i in range(0, min(4 * k, len(exp)), k)]

    def load_weights(self, folder: Path) -> None:
        self.models.load(folder)


class GRPO(GroupRL):
    stage = "grpo"


class RLOO(GroupRL):
    stage = "rloo"


@tracked("grpo")
def run_grpo(config: GRPOConfig) -> Path:
    return run_rl(config, GRPO)


@tracked("rloo")
def run_rloo(config: RLOOConfig) -> Path:
    return run_rl(config, RLOO)
