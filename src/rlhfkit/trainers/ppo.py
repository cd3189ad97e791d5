"""PPO for language models (actor-critic), as in Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et al. 2022.

One iteration (the loop is trainers/rl_loop.py; this file supplies its steps, in order):
  1. rollout  - sample one response per prompt from the policy (KV cache, left-padded prompts);
  2. score    - log-probs under the policy and critic values, then the frozen reference's log-probs and the
                reward model's scores;
  3. shape    - per-token reward -kl_coef * KL_t, plus the RM score at the last response token;
  4. GAE      - advantages and returns, advantages whitened over the batch;
  5. update   - ppo_epochs x mini-batches: clipped policy loss and clipped value loss per micro-batch;
  6. log      - explained variance and the KL controller, then metrics.jsonl, samples, checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.track.stage import tracked
from rlhfkit.core.gae import gae_advantages, whiten_advantages
from rlhfkit.core.kl import kl_penalty
from rlhfkit.core.kl_controller import KLController
from rlhfkit.core.masked import masked_mean
from rlhfkit.core.ppo_loss import aggregate_loss, explained_variance, ppo_policy_loss, ppo_value_loss
from rlhfkit.core.reward_shaping import shape_rewards
from rlhfkit.models.roles import on_shared_base
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.scoring import response_logprobs, response_values
from rlhfkit.trainers.ppo_models import PPOModels, build_optimizers, load_ppo_models
from rlhfkit.trainers.rl_loop import MicroBatch, RLAlgorithm, run_rl


# 1-2. rollout and score ------------------------------------------------------------------------------------
@torch.no_grad()
def rollout_and_score(models: PPOModels, records: list[dict], prompt_ids: list[list[int]],
                      seeds: list[int], config: PPOConfig) -> Experience:
    """Sample one response per prompt, then score every sample with the trained models (policy and critic, and a
    LoRA reference or reward model on their base; frozen models of their own score in `score_frozen`)."""
    started = time.perf_counter()
    samples = sample_responses(models.policy, models.tokenizer, prompt_ids, config.max_new_tokens,
                               config.temperature, config.top_p, batch_size=len(prompt_ids),
                               with_logprobs=config.logprobs_from_sampling, precision=config.mixed_precision, seeds=seeds)
    batch = build_rollout_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                [s.ended for s in samples], models.tokenizer.pad_token_id, config.device)
    texts = [models.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    generated = time.perf_counter()
    models.policy.eval()
    B, R = batch.response_mask.shape
    zeros = batch.response_mask.new_zeros  # float32, on the rollout's device
    exp = Experience(batch, records, texts, scores=zeros(B), logprobs=zeros(B, R), ref_logprobs=zeros(B, R),
                     values=zeros(B, R))
    if config.logprobs_from_sampling:
        for i, sample in enumerate(samples):
            exp.logprobs[i, :len(sample.logprobs)] = torch.tensor(sample.logprobs, device=batch.device)
    for idx, sub in batch.micro_batches(torch.arange(B), scoring_micro_batch(config)):
        width = sub.response_mask.shape[1]
        if not config.logprobs_from_sampling:
            exp.logprobs[idx, :width] = response_logprobs(models.policy, sub, config.temperature)[0]
        exp.values[idx, :width] = response_values(models.critic, sub)
        frozen_scores(models, exp, idx, sub, config, on_base=True)
    exp.timings = {"time/rollout_s": generated - started, "time/score_s": time.perf_counter() - generated}
    return exp


def scoring_micro_batch(config: PPOConfig) -> int:
    """Samples per scoring forward: micro-batches of similar lengths, so less padding, and memory bounded like the
    update's."""
    return config.forward_batch_size or config.mini_batch_size // config.gradient_accumulation_steps


@torch.no_grad()
def score_frozen(models: PPOModels, exp: Experience, config: PPOConfig) -> None:
    """The frozen models' own scoring pass: the reference's log-probs and the reward model's scores, from those of
    them that are models of their own."""
    for idx, sub in exp.batch.micro_batches(torch.arange(len(exp)), scoring_micro_batch(config)):
        frozen_scores(models, exp, idx, sub, config, on_base=False)


def frozen_scores(models: PPOModels, exp: Experience, idx: torch.Tensor, sub, config: PPOConfig,
                  on_base: bool) -> None:
    """One micro-batch's reference log-probs and reward-model scores, from the frozen models that are roles on the
    trained base (`on_base`: LoRA, scored with the trained models) or models of their own (not `on_base`)."""
    width = sub.response_mask.shape[1]
    if on_shared_base(models.ref) == on_base:
        exp.ref_logprobs[idx, :width] = response_logprobs(models.ref, sub, config.temperature)[0]
    if on_shared_base(models.reward.model) == on_base:
        exp.scores[idx] = models.reward(sub, [exp.records[i]["prompt"] for i in idx.tolist()],
                                        [exp.texts[i] for i in idx.tolist()])


# 3-4. shaped rewards and GAE -------------------------------------------------------------------------------
def shaped_advantages(exp: Experience, kl_coef: float, config: PPOConfig) -> dict:
    """-kl_coef * KL_t on every token plus the RM score at the last one, then GAE (whitened): fills
    exp.advantages and exp.returns; returns the reward metrics."""
    mask = exp.batch.response_mask
    kl = kl_penalty(exp.logprobs, exp.ref_logprobs, config.kl_estimator)  # (B, R)
    rewards, metrics = shape_rewards(exp.scores, kl, mask, kl_coef, ended=exp.batch.ended,
                                     missing_eos_penalty=config.missing_eos_penalty,
                                     reward_clip=config.reward_clip, reward_scale=config.reward_scale)
    advantages, exp.returns = gae_advantages(rewards, exp.values, mask, config.gamma, config.lam)
    exp.advantages = whiten_advantages(advantages, mask) if config.whiten_advantages else advantages
    return metrics


# 5. the loss of one micro-batch ----------------------------------------------------------------------------
def micro_batch_loss(mb: MicroBatch, config: PPOConfig) -> dict:
    """Policy and value losses of one micro-batch, each divided by the mini-batch's token count and
    backpropagated as soon as it exists (`mb.backprop`: one model's graph held at a time); its metrics."""
    sub, idx, exp = mb.sub, mb.idx, mb.exp
    mask = sub.response_mask  # (b, R') with R' <= R: the sub-batch drops all-pad columns
    width = mask.shape[1]

    def policy_loss_of(policy):
        # (b, R') each, fp32; the entropy has a gradient only when it is part of the loss.
        logprobs, token_entropy = response_logprobs(policy, sub, config.temperature, with_entropy=True)
        policy_loss, metrics = ppo_policy_loss(
            logprobs, exp.logprobs[idx, :width], exp.advantages[idx, :width], mask, clip_eps=config.clip_eps,
            clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high, dual_clip=config.dual_clip,
            normaliser=mb.normaliser)
        with torch.no_grad():
            metrics["ppo/entropy"] = masked_mean(token_entropy, mask)
        metrics["loss/policy"] = policy_loss.detach()
        if config.entropy_coef:
            return policy_loss - config.entropy_coef * aggregate_loss(token_entropy, mask,
                                                                      normaliser=mb.normaliser), metrics
        return policy_loss, metrics

    def value_loss_of(critic):
        values = response_values(critic, sub)
        return ppo_value_loss(values, exp.values[idx, :width], exp.returns[idx, :width], mask, config.value_clip,
                              normaliser=mb.normaliser)

    return {**mb.backprop("policy", policy_loss_of), **mb.backprop("critic", value_loss_of)}


class PPO(RLAlgorithm):
    stage = "ppo"
    prompts_field = "rollout_batch_size"
    guard_hint = "check the reward model"

    def __init__(self, config: PPOConfig):
        super().__init__(config)
        self.models = load_ppo_models(config)
        self.share_models({"policy": self.models.policy, "critic": self.models.critic})
        self.share_frozen({"reference": self.models.ref, "reward model": self.models.reward.model})
        self.optimizers, self.schedulers = build_optimizers(self.models, config)
        self.kl_ctl = KLController(config.kl_coef, config.kl_target if config.adaptive_kl else None,
                                   config.kl_horizon)
        self.stateful = {"kl_controller": self.kl_ctl}

    def mini_batch_size(self) -> int:
        return self.config.mini_batch_size

    def epochs(self) -> int:
        return self.config.ppo_epochs

    def rollout(self, records, prompt_ids, seeds) -> Experience:
        return rollout_and_score(self.models, records, prompt_ids, seeds, self.config)

    def score(self, exp: Experience) -> None:
        score_frozen(self.models, exp, self.config)

    def advantages(self, exp: Experience) -> dict:
        return shaped_advantages(exp, self.kl_ctl.value, self.config)

    def micro_batch_loss(self, mb: MicroBatch) -> dict:
        return micro_batch_loss(mb, self.config)

    def after_update(self, exp: Experience, metrics: dict) -> dict:
        self.kl_ctl.update(float(metrics["objective/kl"]), len(exp))
        return {"ppo/explained_variance": float(explained_variance(exp.values, exp.returns, exp.batch.response_mask)),
                "objective/kl_coef": self.kl_ctl.value}

    def sample_rows(self, exp: Experience) -> list[dict]:
        return [{"prompt": exp.records[i]["prompt"], "response": exp.texts[i], "score": float(exp.scores[i])}
                for i in range(min(4, len(exp)))]

    def progress(self, row: dict) -> dict:
        return {"score": f"{row['objective/scores']:.3f}", "kl": f"{row['objective/kl']:.3f}"}

    def load_weights(self, folder: Path) -> None:
        self.models.load(folder)


@tracked("ppo")
def run_ppo(config: PPOConfig) -> Path:
    return run_rl(config, PPO)
