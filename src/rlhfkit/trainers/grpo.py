"""GRPO and RLOO: critic-free policy optimisation with group-relative advantages over K samples per prompt.

One iteration reads top to bottom:
  1. rollout  - sample K completions for each of prompts_per_step prompts (each prompt's K contiguous);
  2. score    - log-probs under the policy and the reference (when beta > 0), rewards: a reward model and/or
                Python functions 'module:function', weighted and summed;
  3. baseline - one advantage per completion from its group (GROUP_ADVANTAGES: grpo, dr_grpo, rloo); RLOO
                first subtracts beta * the summed KL from the reward (kl_in_reward);
  4. update   - num_iterations passes of shuffled mini-batches: clipped surrogate with the sequence advantage
                on every token, plus beta * k3 KL to the reference in the loss (GRPO, kl_in_reward off);
  5. log      - metrics.jsonl, sample table, checkpoint.

GRPO is Shao et al. 2024 (DeepSeekMath); RLOO is Ahmadian et al. 2024 ("Back to Basics"). The two differ only
in config defaults (see config.GRPOConfig and config.RLOOConfig), so one loop runs both.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhfkit.config import GRPOConfig, RLOOConfig
from rlhfkit.core.group_advantages import GROUP_ADVANTAGES
from rlhfkit.core.grpo_loss import grpo_policy_loss
from rlhfkit.core.kl import kl_penalty
from rlhfkit.core.masked import masked_mean, masked_sum
from rlhfkit.errors import UserError
from rlhfkit.runtime.precision import autocast, autocast_paused
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.scoring import response_logprobs
from rlhfkit.trainers.checkpoint import load_model_weights, seed_everything
from rlhfkit.trainers.grpo_setup import GroupModels, load_group_models
from rlhfkit.trainers.rl_models import load_prompts_for
from rlhfkit.trainers.guard import NonFiniteGuard
from rlhfkit.trainers.rl_run import checkpoint_iteration, iteration_row, log_iteration, resume
from rlhfkit.trainers.interrupt import stop_on_signals
from rlhfkit.trainers.loop import BatchOrder
from rlhfkit.trainers.metrics_log import MetricsLog
from rlhfkit.trainers.optim import build_optimizer, build_scheduler, clip_gradients
from rlhfkit.trainers.output_dir import prepare_output_dir, resolve_output_dir
from rlhfkit.runtime.precision import resolve_precision

# How much of a mini-batch's loss a micro-batch carries, per loss aggregation: its share of the units the
# aggregation averages over (real tokens; non-empty responses; all rows), so that gradient accumulation gives
# the step one forward over the whole mini-batch would.
_LOSS_UNITS = {
    "token-mean": lambda mask: mask.sum(),
    "seq-mean-token-mean": lambda mask: (mask > 0).any(dim=1).sum().float(),
    "seq-mean-token-sum": lambda mask: (mask > 0).any(dim=1).sum().float(),
    "seq-mean-token-sum-norm": lambda mask: torch.tensor(float(mask.shape[0])),
}


def rollout_size(config: GRPOConfig) -> int:
    return config.prompts_per_step * config.num_generations


def mini_batch_size(config: GRPOConfig) -> int:
    return config.mini_batch_size or rollout_size(config)


def single_on_policy_step(config: GRPOConfig) -> bool:
    """One optimizer step per rollout: the policy that is trained is the one that sampled, the ratio is 1."""
    return config.num_iterations == 1 and mini_batch_size(config) == rollout_size(config)


@torch.no_grad()
def rollout_and_score(models: GroupModels, records: list[dict], prompt_ids: list[list[int]], config: GRPOConfig):
    """Steps 1-2 for B = len(prompt_ids) completions (each prompt repeated K times, contiguously)."""
    started = time.perf_counter()
    samples = sample_responses(models.policy, models.tokenizer, prompt_ids, config.max_new_tokens,
                               config.temperature, config.top_p, batch_size=len(prompt_ids),
                               precision=config.mixed_precision)
    batch = build_rollout_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                [s.ended for s in samples], models.tokenizer.pad_token_id)
    texts = [models.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    generated = time.perf_counter()
    models.policy.eval()
    B, R = batch.response_mask.shape
    # The policy's rollout log-probs are needed for the ratio (unless the one step is on-policy) and for the
    # KL to the reference; the reference's only when beta > 0.
    need_old = models.ref is not None or not single_on_policy_step(config)
    old = {"logprobs": torch.zeros(B, R) if need_old else None,
           "ref_logprobs": torch.zeros(B, R) if models.ref is not None else None}
    sources = models.rewards
    parts = torch.zeros(len(sources.names), B)
    micro = config.forward_batch_size or mini_batch_size(config) // config.gradient_accumulation_steps
    if need_old or sources.model is not None:
        for idx, sub in batch.micro_batches(torch.arange(B), micro):
            width = sub.response_mask.shape[1]
            if need_old:
                old["logprobs"][idx, :width] = response_logprobs(models.policy, sub, config.temperature)[0]
            if models.ref is not None:
                old["ref_logprobs"][idx, :width] = response_logprobs(models.ref, sub, config.temperature)[0]
            if sources.model is not None:
                parts[0, idx] = sources.model(sub, [records[i]["prompt"] for i in idx.tolist()],
                                              [texts[i] for i in idx.tolist()]).float()
    n_model = 1 if sources.model is not None else 0
    parts[n_model:] = sources.function_rewards(records, texts, batch)
    old["reward_parts"] = parts
    old["scores"] = (torch.tensor(sources.weights).unsqueeze(1) * parts).sum(0)  # (B,)
    scored = time.perf_counter()
    return batch, texts, old, {"time/rollout_s": generated - started, "time/score_s": scored - generated}


def group_rewards(old: dict, batch, config: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Step 3's input: each completion's reward (score, EOS penalty, and for RLOO -beta * KL) and its metrics."""
    scores = old["scores"]
    metrics = {"objective/scores": scores.mean(), "objective/scores_std": scores.std() if len(scores) > 1
               else torch.tensor(0.0)}
    rewards = scores.clone()
    if config.missing_eos_penalty is not None:
        rewards = rewards - config.missing_eos_penalty * (~batch.ended).float()
    if old["ref_logprobs"] is not None:
        mask = batch.response_mask
        estimator = config.kl_estimator if config.kl_in_reward else "k3"  # the KL that is optimised
        kl = masked_sum(kl_penalty(old["logprobs"], old["ref_logprobs"], estimator), mask > 0, dim=1)  # (B,)
        metrics["objective/kl"] = kl.mean()
        if config.kl_in_reward:
            rewards = rewards - config.beta * kl
            metrics["objective/non_score_reward"] = (-config.beta * kl).mean()
    metrics["objective/rlhf_reward"] = rewards.mean()
    return rewards, metrics


def _micro_batch_backward(models: GroupModels, sub, idx, old: dict, advantages, mask, share,
                          config: GRPOConfig) -> dict:
    """The loss of one micro-batch, backpropagated with weight `share`; returns its metrics."""
    width = sub.response_mask.shape[1]
    # (b, R') each, fp32; the entropy is only logged, so no gradient flows back through it.
    logprobs, token_entropy = response_logprobs(models.policy, sub, config.temperature, with_entropy=True)
    old_logprobs = logprobs.detach() if old["logprobs"] is None else old["logprobs"][idx, :width]
    kl_in_loss = old["ref_logprobs"] is not None and not config.kl_in_reward
    loss, metrics = grpo_policy_loss(
        logprobs, old_logprobs, old["ref_logprobs"][idx, :width] if kl_in_loss else None, advantages[idx], mask,
        clip_eps=config.clip_eps, kl_coef=config.beta if kl_in_loss else 0.0, aggregation=config.loss_aggregation,
        max_tokens=config.max_new_tokens, clip_eps_high=config.clip_eps_high)
    entropy = masked_mean(token_entropy.detach(), mask > 0)
    # Backward runs in the dtypes the forward chose; autocast must not recast it.
    with autocast_paused():
        (loss * share).backward()
    metrics.pop("ppo/dual_clipfrac", None)  # no dual clip here
    return {**metrics, "ppo/entropy": entropy, "loss/policy": loss.detach()}


def group_update(models: GroupModels, optimizer, scheduler, batch, old: dict, advantages, config: GRPOConfig,
                 generator: torch.Generator, guard: NonFiniteGuard) -> dict:
    """Step 4: num_iterations passes of shuffled mini-batches, one optimizer step each."""
    B = len(batch)
    mini = mini_batch_size(config)
    micro = mini // config.gradient_accumulation_steps
    units = _LOSS_UNITS[config.loss_aggregation]
    loss_mask = batch.response_mask
    if config.mask_truncated_completions:
        loss_mask = loss_mask * batch.ended.unsqueeze(1).float()
    sums: dict[str, float] = {}
    n_updates = 0
    models.policy.train()
    for _ in range(config.num_iterations):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, mini):
            rows = order[start:start + mini]
            total = units(loss_mask[rows]).clamp(min=1.0)
            # One autocast context per mini-batch, closed before the optimizer steps. Autocast keeps its bf16
            # copy of each weight until its context exits: the micro-batches share one cast, and no forward
            # after a step can see the weights from before it (a context around the whole update would).
            with autocast(config.mixed_precision):
                for idx, sub in batch.micro_batches(rows, micro):
                    mask = loss_mask[idx, :sub.response_mask.shape[1]]
                    share = units(mask) / total  # this micro-batch's part of the mini-batch's loss
                    metrics = _micro_batch_backward(models, sub, idx, old, advantages, mask, share, config)
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * float(share)
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            norm = clip_gradients([p for p in models.policy.parameters() if p.requires_grad], max_norm)
            # A non-finite gradient (from a NaN/inf loss or reward) skips this mini-batch's step.
            if guard.allows(norm):
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm/policy"] = sums.get("grad_norm/policy", 0.0) + norm
            n_updates += 1
    models.policy.eval()
    return {k: v / n_updates for k, v in sums.items()}


def _repeat(items: list, k: int) -> list:
    return [item for item in items for _ in range(k)]


def run_group(config: GRPOConfig, stage: str) -> Path:
    resolve_precision(config)
    out = resolve_output_dir(config, stage)
    records = load_prompts_for(config, keep_extra=True)
    if len(records) < config.prompts_per_step:
        raise UserError(f"{config.data or 'prompts'}: {len(records)} prompts, fewer than prompts_per_step "
                        f"({config.prompts_per_step})")
    seed_everything(config.seed)
    models = load_group_models(config)
    prompt_ids = models.encode_prompts(records)
    prepare_output_dir(out, config)
    K = config.num_generations
    optimizer = build_optimizer(models.policy, config)
    scheduler = build_scheduler(optimizer, config,
                                config.max_steps * config.num_iterations * (rollout_size(config) // mini_batch_size(config)))
    order = BatchOrder(len(records), config.prompts_per_step, config.seed, drop_last=True)
    generator = torch.Generator().manual_seed(config.seed)
    guard = NonFiniteGuard(config.max_bad_steps)  # counts mini-batches skipped for a non-finite gradient
    stateful = {"policy_optimizer": optimizer, "policy_scheduler": scheduler, "guard": guard}
    advantage_fn = GROUP_ADVANTAGES[config.advantage]

    step, resumed_from = resume(out, config, stateful, generator,
                                lambda folder: load_model_weights(models.policy, folder))
    log = MetricsLog(out / "metrics.jsonl", resume_step=resumed_from)
    samples_log = MetricsLog(out / "samples.jsonl", resume_step=resumed_from)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.max_steps, initial=step, desc=stage, disable=not config.progress, dynamic_ncols=True)
    # SIGTERM / Ctrl-C: finish the iteration, write a checkpoint, stop (see interrupt.py).
    with stop_on_signals() as stop:
        while step < config.max_steps:
            started = time.perf_counter()
            rows = order.indices(step)
            batch_records = _repeat([records[i] for i in rows], K)  # rows [g K, (g + 1) K): prompt g's group
            # 1-2. rollout and score
            with autocast(config.mixed_precision):
                batch, texts, old, timings = rollout_and_score(models, batch_records,
                                                               _repeat([prompt_ids[i] for i in rows], K), config)
            # 3. group baselines
            rewards, metrics = group_rewards(old, batch, config)
            advantages, group_metrics = advantage_fn(rewards, K)
            metrics.update(group_metrics)
            for name, part in zip(models.rewards.names, old["reward_parts"]):
                metrics[f"rewards/{name}"] = part.mean()
            # 4. updates
            trained = time.perf_counter()
            metrics.update(group_update(models, optimizer, scheduler, batch, old, advantages, config, generator,
                                        guard))
            trained = time.perf_counter() - trained
            # 5. logs
            step += 1
            elapsed = time.perf_counter() - started
            row = iteration_row(step, metrics, timings, batch, trained, elapsed, guard, models, batch_records, texts)
            log_iteration(step, row, config, log, guard, out, bar, "check the rewards")
            if config.sample_every and (step % config.sample_every == 0 or step == 1):
                for i in range(0, min(4 * K, len(batch)), K):  # the first completion of the first 4 prompts
                    samples_log.write({"step": step, "prompt": batch_records[i]["prompt"], "response": texts[i],
                                       "score": float(old["scores"][i]), "advantage": float(advantages[i])})
            checkpoint_iteration(step, config, out, stop, models.save, stateful, generator, bar)
            bar.update(1)
            bar.set_postfix(score=f"{row['objective/scores']:.3f}")
    bar.close()
    models.save(out)
    return out


def run_grpo(config: GRPOConfig) -> Path:
    return run_group(config, "grpo")


def run_rloo(config: RLOOConfig) -> Path:
    return run_group(config, "rloo")
