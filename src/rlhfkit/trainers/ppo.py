"""PPO for language models (actor-critic), as in Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et al. 2022.

One iteration reads top to bottom:
  1. rollout  - sample one response per prompt from the policy (KV cache, left-padded prompts);
  2. score    - log-probs under the policy and the frozen reference, critic values, reward-model scores;
  3. shape    - per-token reward -kl_coef * KL_t, plus the RM score at the last response token;
  4. GAE      - advantages and returns, advantages whitened over the batch;
  5. update   - ppo_epochs x mini-batches: clipped policy loss and clipped value loss;
  6. log      - metrics.jsonl, sample table, checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.core.gae import gae_advantages, whiten_advantages
from rlhfkit.core.kl import kl_penalty
from rlhfkit.core.kl_controller import build_kl_controller
from rlhfkit.core.masked import masked_mean
from rlhfkit.core.ppo_loss import explained_variance, ppo_policy_loss, ppo_value_loss
from rlhfkit.core.reward_shaping import shape_rewards
from rlhfkit.errors import UserError
from rlhfkit.models.loading import check_fits_context
from rlhfkit.runtime.precision import autocast, autocast_paused
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.scoring import response_logprobs, response_values
from rlhfkit.trainers.checkpoint import (load_model_weights,
                                         seed_everything)
from rlhfkit.trainers.guard import NonFiniteGuard
from rlhfkit.trainers.rl_run import checkpoint_iteration, iteration_row, log_iteration, resume
from rlhfkit.trainers.interrupt import stop_on_signals
from rlhfkit.trainers.loop import BatchOrder
from rlhfkit.trainers.metrics_log import MetricsLog
from rlhfkit.trainers.optim import clip_gradients
from rlhfkit.trainers.ppo_setup import PPOModels, build_optimizers, load_ppo_models
from rlhfkit.trainers.rl_models import load_prompts_for
from rlhfkit.trainers.output_dir import prepare_output_dir, resolve_output_dir
from rlhfkit.runtime.precision import resolve_precision


@torch.no_grad()
def rollout_and_score(models: PPOModels, records: list[dict], prompt_ids: list[list[int]], config: PPOConfig):
    """Steps 1-2: sample, then score with every model. Returns the batch, texts, tensors and timings."""
    started = time.perf_counter()
    samples = sample_responses(models.policy, models.tokenizer, prompt_ids, config.max_new_tokens,
                               config.temperature, config.top_p, batch_size=len(prompt_ids),
                               with_logprobs=config.logprobs_from_sampling, precision=config.mixed_precision)
    batch = build_rollout_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                [s.ended for s in samples], models.tokenizer.pad_token_id)
    texts = [models.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    generated = time.perf_counter()
    models.policy.eval()
    B, R = batch.response_mask.shape
    tensors = {name: torch.zeros(B, R) for name in ("logprobs", "ref_logprobs", "values")}
    tensors["scores"] = torch.zeros(B)
    # Score in micro-batches of similar lengths: less padding, and memory bounded like the update's.
    micro = config.forward_batch_size or config.mini_batch_size // config.gradient_accumulation_steps
    if config.logprobs_from_sampling:
        for i, sample in enumerate(samples):
            tensors["logprobs"][i, :len(sample.logprobs)] = torch.tensor(sample.logprobs)
    for idx, sub in batch.micro_batches(torch.arange(B), micro):
        width = sub.response_mask.shape[1]
        if not config.logprobs_from_sampling:
            tensors["logprobs"][idx, :width] = response_logprobs(models.policy, sub, config.temperature)[0]
        tensors["ref_logprobs"][idx, :width] = response_logprobs(models.ref, sub, config.temperature)[0]
        tensors["values"][idx, :width] = response_values(models.critic, sub)
        tensors["scores"][idx] = models.reward(sub, [records[i]["prompt"] for i in idx.tolist()],
                                               [texts[i] for i in idx.tolist()])
    scored = time.perf_counter()
    return batch, texts, tensors, {"time/rollout_s": generated - started, "time/score_s": scored - generated}


def _micro_batch_backward(models: PPOModels, sub, idx, old: dict, advantages, returns, share,
                          config: PPOConfig) -> dict:
    """Policy and value losses of one micro-batch, backpropagated with weight `share`; returns its metrics."""
    mask = sub.response_mask  # (b, R') with R' <= R: the sub-batch drops all-pad columns
    width = mask.shape[1]
    # (b, R') each, fp32; the entropy has a gradient only when it is part of the loss.
    logprobs, token_entropy = response_logprobs(models.policy, sub, config.temperature, with_entropy=True)
    policy_loss, p_metrics = ppo_policy_loss(
        logprobs, old["logprobs"][idx, :width], advantages[idx, :width], mask, clip_eps=config.clip_eps,
        clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high, dual_clip=config.dual_clip)
    with torch.set_grad_enabled(config.entropy_coef > 0):
        entropy = masked_mean(token_entropy, mask)
    loss = policy_loss - config.entropy_coef * entropy if config.entropy_coef else policy_loss
    # Backward as soon as each loss exists, so that only one model's graph is held at a time; backward runs
    # in the dtypes the forward chose, and autocast must not recast it.
    with autocast_paused():
        (loss * share).backward()
    values = response_values(models.critic, sub)
    value_loss, v_metrics = ppo_value_loss(values, old["values"][idx, :width], returns[idx, :width], mask,
                                           config.value_clip)
    with autocast_paused():
        (value_loss * share).backward()
    return {**p_metrics, **v_metrics, "ppo/entropy": entropy.detach(), "loss/policy": policy_loss.detach()}


def ppo_update(models: PPOModels, optimizers: dict, batch, old: dict, advantages, returns, config: PPOConfig,
               generator: torch.Generator, guard: NonFiniteGuard) -> dict:
    """Step 5: ppo_epochs passes of shuffled mini-batches; each mini-batch is one optimizer step per model.

    Losses are normalised by the mini-batch's token count (not per micro-batch), so gradient accumulation
    gives the same step as one forward over the whole mini-batch.
    """
    B = len(batch)
    micro = config.mini_batch_size // config.gradient_accumulation_steps
    sums: dict[str, float] = {}
    n_updates = 0
    models.policy.train()
    models.critic.train()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, config.mini_batch_size):
            rows = order[start:start + config.mini_batch_size]
            tokens = batch.response_mask[rows].sum().clamp(min=1.0)
            # One autocast context per mini-batch, closed before the optimizer steps. Autocast keeps its bf16
            # copy of each weight until its context exits: the micro-batches share one cast, and no forward
            # after a step can see the weights from before it (a context around the whole update would).
            with autocast(config.mixed_precision):
                for idx, sub in batch.micro_batches(rows, micro):
                    share = sub.response_mask.sum() / tokens  # this micro-batch's part of the mini-batch's tokens
                    metrics = _micro_batch_backward(models, sub, idx, old, advantages, returns, share, config)
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * float(share)
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            norms = {name: clip_gradients([p for p in model.parameters() if p.requires_grad], max_norm)
                     for name, model in (("policy", models.policy), ("critic", models.critic))}
            # A non-finite gradient (from a NaN/inf loss) skips both models' steps for this mini-batch.
            finite = guard.allows(*norms.values())
            for name, norm in norms.items():
                sums[f"grad_norm/{name}"] = sums.get(f"grad_norm/{name}", 0.0) + norm
                if finite:
                    optimizers[f"{name}_optimizer"].step()
                    optimizers[f"{name}_scheduler"].step()
                optimizers[f"{name}_optimizer"].zero_grad(set_to_none=True)
            n_updates += 1
    models.policy.eval()
    models.critic.eval()
    return {k: v / n_updates for k, v in sums.items()}


def run_ppo(config: PPOConfig) -> Path:
    resolve_precision(config)
    out = resolve_output_dir(config, "ppo")
    records = load_prompts_for(config)
    if len(records) < config.rollout_batch_size:
        raise UserError(f"{config.data or 'prompts'}: {len(records)} prompts, fewer than rollout_batch_size "
                        f"({config.rollout_batch_size})")
    seed_everything(config.seed)  # before loading: a fresh critic head is initialised from the RNG
    models = load_ppo_models(config)
    check_fits_context(models.policy, config.max_prompt_length + config.max_new_tokens, "max_new_tokens")
    prompt_ids = models.encode_prompts(records)
    prepare_output_dir(out, config)
    optimizers = build_optimizers(models, config)
    kl_ctl = build_kl_controller("adaptive" if config.adaptive_kl else "fixed", config.kl_coef,
                                 config.kl_target, config.kl_horizon)
    order = BatchOrder(len(records), config.rollout_batch_size, config.seed, drop_last=True)
    generator = torch.Generator().manual_seed(config.seed)
    guard = NonFiniteGuard(config.max_bad_steps)  # counts mini-batches skipped for a non-finite gradient
    stateful = {**optimizers, "kl_controller": kl_ctl, "guard": guard}

    def load_weights(folder: Path) -> None:
        load_model_weights(models.policy, folder)
        load_model_weights(models.critic, folder / "critic")

    step, resumed_from = resume(out, config, stateful, generator, load_weights)
    log = MetricsLog(out / "metrics.jsonl", resume_step=resumed_from)
    samples_log = MetricsLog(out / "samples.jsonl", resume_step=resumed_from)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.max_steps, initial=step, desc="ppo", disable=not config.progress, dynamic_ncols=True)
    # SIGTERM / Ctrl-C: finish the iteration, write a checkpoint, stop (see interrupt.py).
    with stop_on_signals() as stop:
        while step < config.max_steps:
            started = time.perf_counter()
            rows = order.indices(step)
            batch_records = [records[i] for i in rows]
            # 1-2. rollout and score
            with autocast(config.mixed_precision):
                batch, texts, old, timings = rollout_and_score(models, batch_records, [prompt_ids[i] for i in rows],
                                                               config)
            mask = batch.response_mask
            # 3. shape rewards: -kl_coef * KL_t per token, RM score at the last response token
            kl = kl_penalty(old["logprobs"], old["ref_logprobs"], config.kl_estimator)  # (B, R)
            rewards, metrics = shape_rewards(old["scores"], kl, mask, kl_ctl.value, ended=batch.ended,
                                             missing_eos_penalty=config.missing_eos_penalty,
                                             score_clip=config.reward_clip, score_scale=config.reward_scale)
            # 4. GAE
            advantages, returns = gae_advantages(rewards, old["values"], mask, config.gamma, config.lam)
            if config.whiten_advantages:
                advantages = whiten_advantages(advantages, mask)
            # 5. PPO epochs over mini-batches
            trained = time.perf_counter()
            metrics.update(ppo_update(models, optimizers, batch, old, advantages, returns, config, generator, guard))
            trained = time.perf_counter() - trained
            # 6. controller and logs
            kl_ctl.update(float(metrics["objective/kl"]), len(batch))
            step += 1
            elapsed = time.perf_counter() - started
            row = iteration_row(step, metrics, timings, batch, trained, elapsed, guard, models, batch_records, texts)
            row["ppo/explained_variance"] = float(explained_variance(old["values"], returns, mask))
            row["objective/kl_coef"] = kl_ctl.value
            log_iteration(step, row, config, log, guard, out, bar, "check the reward model")
            if config.sample_every and (step % config.sample_every == 0 or step == 1):
                for i in range(min(4, len(batch))):
                    samples_log.write({"step": step, "prompt": batch_records[i]["prompt"], "response": texts[i],
                                       "score": float(old["scores"][i])})
            checkpoint_iteration(step, config, out, stop, models.save, stateful, generator, bar)
            bar.update(1)
            bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}")
    bar.close()
    models.save(out)
    return out
