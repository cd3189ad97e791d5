"""The RL iteration that PPO, GRPO and RLOO share, written once (cleanrl's shape: one loop, top to bottom).

Each iteration:
  1-2. rollout and score  - the algorithm samples responses and scores them with its trained models into an
                            `Experience`, then with its frozen ones (the reference, the reward model);
  3-4. rewards, advantages - the algorithm's own (PPO: KL-shaped per-token rewards and GAE; GRPO/RLOO: group
                            baselines);
  5.   update            - epochs x shuffled mini-batches x micro-batches: the algorithm's loss per micro-batch,
                            divided by the mini-batch's loss units (core.ppo_loss.loss_units), then clipping, the
                            non-finite guard and one optimizer step per trained model;
  6.   log               - metrics.jsonl, samples.jsonl, checkpoint (also on SIGTERM / Ctrl-C).

Under a launcher with N processes, the iteration's batch stays global: each process samples and scores its share
of the prompts (a prompt's K samples stay together), every sample seeded by its global index
(rollout.generate.sample_seeds), and the shares are gathered (rollout/gather.py), so that steps 3-4 run on the
whole batch, in every process alike. In step 5 each process computes its share of every mini-batch, normalised
by the mini-batch's global units, and the gradients are summed over processes before clipping
(models.parallel.TrainedRoles): N processes take the one-process step. With `distributed: fsdp` the trained
models are sharded (FSDP2): each rollout runs inside `parallel.gathered()`, which gathers them whole once (and
with `fsdp_frozen: shard` the frozen models' scoring pass inside `frozen.gathered()`, once the trained ones are
sharded again), and the update runs in lockstep, a process short of rows taking part with stand-in micro-batches
whose loss counts zero, so that every process runs the same collectives.

An algorithm is a class with the attributes and methods of `RLAlgorithm`; ppo.py and grpo.py each define one
and read top to bottom in the same order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.core.ppo_loss import loss_units
from rlhfkit.errors import UserError
from rlhfkit.models.loading import check_fits_context, load_causal_lm
from rlhfkit.models.trained import uses_lora, write_merged
from rlhfkit.rollout.experience import Experience
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.guard import NonFiniteGuard
from rlhfkit.runtime.interrupt import stop_on_signals
from rlhfkit.runtime.model_card import write_model_card
from rlhfkit.runtime.output_dir import prepare_output_dir, resolve_output_dir
from rlhfkit.runtime.device import resolve_device, stage_device
from rlhfkit.models.parallel import FrozenModels, TrainedRoles, fsdp_rollouts_supported
from rlhfkit.rollout.batch import RolloutBatch
from rlhfkit.rollout.gather import gather_experience
from rlhfkit.rollout.generate import sample_seeds
from rlhfkit.runtime.distributed import (Processes, barrier, my_samples, my_share, processes, sum_across,
                                         sum_dicts_across)
from rlhfkit.runtime.precision import LossScaler, autocast, resolve_precision
from rlhfkit.runtime.batch_order import BatchOrder
from rlhfkit.runtime.sharded_state import ShardedState
from rlhfkit.trainers.optim import clip_gradients
from rlhfkit.trainers.rl_models import load_prompts_for
from rlhfkit.trainers.run_context import RunContext

# Metrics that are (parts of) the loss: each micro-batch's is already divided by the mini-batch's units, so
# they add up; every other metric is a mean over the micro-batch and is weighted by its share of the units.
ADDITIVE_METRICS = frozenset({"loss/policy", "loss/value", "ppo/policy_loss", "grpo/loss"})


@dataclass
class MicroBatch:
    """One micro-batch of the update, and the way its losses reach the trained models."""

    sub: RolloutBatch           # its rows, all-pad columns dropped: response_mask (b, R') with R' <= R
    idx: torch.Tensor           # (b,) those rows' places in `exp`
    exp: Experience
    normaliser: torch.Tensor    # () the mini-batch's loss units over all processes
    parallel: TrainedRoles
    backward: Callable[[torch.Tensor], None]  # the run's loss scaler's backward
    counts: bool = True         # False: a stand-in (FSDP lockstep), run for the collectives, its loss times 0

    def backprop(self, role: str, fn: Callable) -> dict:
        """Run `fn(model)` -> (loss, metrics) on the trained model `role` and backpropagate the loss at once (so
        that one model's graph is held at a time); return the metrics."""
        _, loss, metrics = self.parallel.loss(role, fn)
        # in the dtypes the forward chose (autocast must not recast it); fp16: through the loss scaler
        self.backward(loss if self.counts else loss * 0.0)
        return metrics


class RLAlgorithm:
    """What an RL method supplies to `run_rl` (a template: ppo.py and grpo.py subclass it)."""

    stage: str                       # "ppo", "grpo", "rloo"
    keep_extra_fields = False        # keep prompt records' other fields (for reward functions)
    prompts_field = "rollout_batch_size"  # the config field: prompts sampled per iteration
    guard_hint = "check the reward model"  # the end of the message when too many updates were non-finite
    loss_aggregation = "token-mean"  # how losses are normalised (core.ppo_loss.LOSS_AGGREGATIONS)

    def __init__(self, config):
        self.config = config
        self.models = None           # a bundle with .policy, .tokenizer, .save(folder), .encode_prompts, .gold
        self.trained: dict[str, torch.nn.Module] = {}        # name -> trained model
        self.parallel: TrainedRoles | None = None            # how the update reaches them (set before optimizers)
        self.frozen: FrozenModels | None = None              # the frozen models, whole or sharded (share_frozen)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, object] = {}
        self.stateful: dict[str, object] = {}                # also saved in checkpoints (e.g. a KL controller)
        self.device = stage_device(config)                   # where models, rollouts and updates live
        self.scaler = LossScaler(config.mixed_precision, self.device.type)  # fp16's loss scale; backward uses it

    # Sizes of one iteration.
    def samples_per_prompt(self) -> int:
        return 1

    def mini_batch_size(self) -> int:
        raise NotImplementedError

    def epochs(self) -> int:
        raise NotImplementedError

    # The steps.
    def rollout(self, records: list[dict], prompt_ids: list[list[int]], seeds: list[int]) -> Experience:
        """Sample (one seed per sample: rollout.generate.sample_seeds) and score these prompts with the trained
        models."""
        raise NotImplementedError

    def score(self, exp: Experience) -> None:
        """Score a rollout with the frozen models (the reference, the reward model) and fill exp.scores."""
        raise NotImplementedError

    def advantages(self, exp: Experience) -> dict:
        """Fill exp.advantages (and exp.returns); return the iteration's reward metrics."""
        raise NotImplementedError

    def share_models(self, trained: dict[str, torch.nn.Module]) -> None:
        """Set the trained models and how they are reached across processes (FSDP shards them here: call it
        before building the optimizers)."""
        self.trained = trained
        self.parallel = TrainedRoles(trained, processes(), self.device, self.config.distributed)

    def share_frozen(self, frozen: dict[str, torch.nn.Module | None]) -> None:
        """Set the frozen models (name -> model, None when absent): sharded with `fsdp_frozen: shard` under FSDP."""
        shard = self.config.distributed == "fsdp" and self.config.fsdp_frozen == "shard"
        procs = processes()
        self.frozen = FrozenModels(frozen, procs, self.device, shard)
        if self.frozen.sharded and procs.main:
            print(f"fsdp_frozen: {', '.join(self.frozen.names)} sharded over {procs.world} processes")

    def micro_batch_loss(self, mb: MicroBatch) -> dict:
        """Forward and backward of one micro-batch, each loss through `mb.backprop`; its metrics."""
        raise NotImplementedError

    def after_update(self, exp: Experience, metrics: dict) -> dict:
        """Extra metrics once the update is done (and state to update, e.g. a KL controller)."""
        return {}

    def sample_rows(self, exp: Experience) -> list[dict]:
        """A few samples for samples.jsonl."""
        return []

    def progress(self, row: dict) -> dict:
        return {"score": f"{row['objective/scores']:.3f}"}

    def load_weights(self, folder: Path) -> None:
        raise NotImplementedError


def my_micro_batches(exp: Experience, rows: torch.Tensor, micro: int, normaliser: torch.Tensor, algo: RLAlgorithm,
                     procs: Processes) -> list[MicroBatch]:
    """This process's micro-batches of the mini-batch `rows`: its share (every N-th row, maybe none) in
    micro-batches of `micro` rows. In lockstep (FSDP) a process with fewer than the busiest one's adds stand-ins
    (the mini-batch's first row, its loss counting zero): every process runs the same forwards and backwards."""
    def make(idx, sub, counts=True):
        return MicroBatch(sub, idx, exp, normaliser, algo.parallel, algo.scaler.backward, counts)

    batches = [make(idx, sub) for idx, sub in exp.batch.micro_batches(rows[procs.rank::procs.world], micro)]
    if algo.parallel.lockstep:
        busiest = math.ceil(math.ceil(len(rows) / procs.world) / micro)  # process 0 holds the most rows
        stand_in = rows[:1].to(exp.batch.device)
        batches += [make(stand_in, exp.batch.select(stand_in), False) for _ in range(busiest - len(batches))]
    return batches


def update(run: RunContext, algo: RLAlgorithm, exp: Experience, generator: torch.Generator) -> dict:
    """Step 5: epochs of shuffled mini-batches; each mini-batch is one optimizer step per trained model.

    A micro-batch's loss is divided by the units (tokens or responses) of its whole mini-batch, so gradient
    accumulation gives exactly the step one forward over the mini-batch would."""
    config = run.config
    procs = processes()
    mini = algo.mini_batch_size()
    micro = mini // config.gradient_accumulation_steps  # per process
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    sums: dict[str, float] = {}       # this process's share of each metric
    norm_sums: dict[str, float] = {}  # gradient norms: the same in every process (the gradients are summed)
    n_updates = 0
    for model in algo.trained.values():
        model.train()
    for _ in range(algo.epochs()):
        order = torch.randperm(len(exp), generator=generator)
        for start in range(0, len(exp), mini):
            rows = order[start:start + mini]
            normaliser = loss_units(exp.mask[rows], algo.loss_aggregation).clamp(min=1.0)  # global: exp is
            # One autocast context per mini-batch, closed before the optimizer steps. Autocast keeps its bf16
            # copy of each weight until its context exits: the micro-batches share one cast, and no forward
            # after a step can see the weights from before it (a context around the whole update would).
            with autocast(config.mixed_precision, algo.device.type):
                for mb in my_micro_batches(exp, rows, micro, normaliser, algo, procs):
                    metrics = algo.micro_batch_loss(mb)
                    if not mb.counts:
                        continue
                    share = float(loss_units(exp.mask[mb.idx, :mb.sub.response_mask.shape[1]],
                                             algo.loss_aggregation) / normaliser)
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * (1.0 if key in ADDITIVE_METRICS else share)
            algo.parallel.reduce_gradients()  # the whole mini-batch's gradient, everywhere
            for optimizer in algo.optimizers.values():
                algo.scaler.unscale(optimizer)  # fp16: true-sized gradients before clipping
            norms = {name: clip_gradients([p for p in model.parameters() if p.requires_grad], max_norm)
                     for name, model in algo.trained.items()}
            # A non-finite gradient (from a NaN/inf loss or reward) skips every model's step for this mini-batch;
            # under fp16 an overflow of the scaled gradients does too, and the scaler halves its scale.
            if algo.scaler.overflowed(*norms.values()):
                run.guard.overflow()
                finite = False
            else:
                finite = run.guard.allows(*norms.values())
            for name, norm in norms.items():
                norm_sums[f"grad_norm/{name}"] = norm_sums.get(f"grad_norm/{name}", 0.0) + norm
                if finite:
                    algo.scaler.step(algo.optimizers[name])
                    algo.schedulers[name].step()
                algo.optimizers[name].zero_grad(set_to_none=True)
            algo.scaler.update()
            n_updates += 1
    for model in algo.trained.values():
        model.eval()
    sums = sum_dicts_across(sums, procs)  # each process summed its share (one with no share has no keys)
    return {k: v / n_updates for k, v in {**sums, **norm_sums}.items()}


def iteration_row(run: RunContext, algo: RLAlgorithm, exp: Experience, step: int, metrics: dict) -> dict:
    """The metrics row every iteration logs: the update's metrics and phase times, response lengths and ends,
    skipped updates, throughput, and the gold score of the samples when a gold scorer is loaded."""
    mask = exp.batch.response_mask
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}, **exp.timings,
           "response/length_mean": float(mask.sum(1).mean()),
           "response/ended_fraction": float(exp.batch.ended.float().mean()),
           "train/skipped_steps": run.guard.skipped, "perf/samples_per_s": len(exp) / exp.timings["time/step_s"]}
    if algo.scaler.active:
        row["train/loss_scale"] = algo.scaler.scale
    if algo.models.gold is not None:  # each process scores its share
        procs = processes()
        mine = my_share(list(range(len(exp))), procs)
        total = sum(algo.models.gold_scores([exp.records[i] for i in mine], [exp.texts[i] for i in mine])) \
            if mine else 0.0
        row["objective/gold"] = sum_across([total], procs)[0] / len(exp.texts)
    return row


def _repeat(items: list, k: int) -> list:
    return [item for item in items for _ in range(k)]


def run_rl(config, algorithm: type[RLAlgorithm]) -> Path:
    """Set up, resume and run `algorithm` for config.max_steps iterations; write the policy to output_dir."""
    device = resolve_device(config)
    procs = processes()
    if procs.many and config.distributed == "fsdp" and not fsdp_rollouts_supported():
        raise UserError(f"distributed: fsdp: {algorithm.stage} needs torch >= 2.13 (FSDPModule.reset_iter_state, "
                        f"to gather the models once per rollout); use distributed: ddp, or upgrade torch")
    resolve_precision(config, device.type)
    out = resolve_output_dir(config, algorithm.stage)
    records = load_prompts_for(config, keep_extra=algorithm.keep_extra_fields)
    n_prompts = getattr(config, algorithm.prompts_field)
    if len(records) < n_prompts:
        raise UserError(f"{config.data or 'prompts'}: {len(records)} prompts, fewer than {algorithm.prompts_field} "
                        f"({n_prompts})")
    seed_everything(config.seed)  # before loading: a fresh critic head is initialised from the RNG
    algo = algorithm(config)
    check_fits_context(algo.models.policy, config.max_prompt_length + config.max_new_tokens, "max_new_tokens")
    prompt_ids = algo.models.encode_prompts(records)
    prepare_output_dir(out, config)
    k = algo.samples_per_prompt()
    order = BatchOrder(len(records), n_prompts, config.seed, drop_last=True)
    generator = torch.Generator().manual_seed(config.seed)  # the update's mini-batch order
    guard = NonFiniteGuard(config.max_bad_steps)  # counts mini-batches skipped for a non-finite gradient
    stateful = {**{f"{n}_optimizer": o for n, o in algo.optimizers.items()},
                **{f"{n}_scheduler": s for n, s in algo.schedulers.items()}, **algo.stateful, "guard": guard}
    if algo.scaler.active:
        stateful["loss_scaler"] = algo.scaler
    # Checkpoints on several processes (and on one under FSDP) hold the trained models and their optimizers in
    # torch.distributed.checkpoint's files, which any layout reads
    sharded = ShardedState(algo.parallel.owners(), list(algo.optimizers.values()),
                           covers=tuple(f"{n}_optimizer" for n in algo.optimizers))
    run = RunContext(config, out, config.max_steps, guard, stateful, unit="iteration", sharded=sharded,
                     shard_writes=procs.many or config.distributed == "fsdp", reads_plain=not algo.parallel.lockstep)
    state = run.resume(algo.load_weights)
    step = 0
    if state is not None:
        step = state["step"]
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    log, samples_log = run.log("metrics"), run.log("samples")
    bar = run.start_progress(step, algo.stage)
    # SIGTERM / Ctrl-C: finish the iteration, write a checkpoint, stop (see runtime/interrupt.py).
    with stop_on_signals() as run.stop:
        while step < config.max_steps:
            started = time.perf_counter()
            rows = order.indices(step)
            # 1-2. rollout and score (each prompt's k samples contiguous); this process's share of the prompts,
            # then every process's shares joined into the global batch
            prompts = my_share(rows, procs)
            indices = my_samples(len(rows), k, procs)
            local = None
            with algo.parallel.gathered():  # FSDP: the trained models whole, gathered once by every process
                if prompts:
                    with autocast(config.mixed_precision, device.type):
                        local = algo.rollout(_repeat([records[i] for i in prompts], k),
                                             _repeat([prompt_ids[i] for i in prompts], k),
                                             sample_seeds(config.seed, step, indices))
            with algo.frozen.gathered():  # fsdp_frozen: shard: the frozen models whole, the trained ones sharded
                if local is not None:
                    scored = time.perf_counter()
                    with autocast(config.mixed_precision, device.type):
                        algo.score(local)
                    local.timings["time/score_s"] += time.perf_counter() - scored
            exp = gather_experience(local, indices, procs, algo.models.tokenizer.pad_token_id, device)
            # 3-4. rewards and advantages
            metrics = algo.advantages(exp)
            # 5. update
            trained = time.perf_counter()
            metrics.update(update(run, algo, exp, generator))
            exp.timings["time/train_s"] = time.perf_counter() - trained
            extra = algo.after_update(exp, metrics)
            # 6. log, samples, checkpoint
            step += 1
            exp.timings["time/step_s"] = time.perf_counter() - started
            row = {**iteration_row(run, algo, exp, step, metrics), **extra}
            if step % config.log_every == 0 or step == config.max_steps or guard.exhausted:
                log.write(row)
            run.stop_if_exhausted(f"iteration {step}: {guard.in_a_row} mini-batches in a row had a non-finite "
                                  f"gradient and were skipped; stopping (max_bad_steps). Checkpoints in "
                                  f"{out}/checkpoints are intact; lower the learning rate or {algo.guard_hint}")
            if config.sample_every and (step % config.sample_every == 0 or step == 1):
                for sample in algo.sample_rows(exp):
                    samples_log.write({"step": step, **sample})
            run.checkpoint_when_due(step, algo.models.save, {"generator": generator.get_state().tolist()})
            bar.update(1)
            bar.set_postfix(**algo.progress(row))
    run.close_progress()
    states = algo.parallel.full_state_dicts()  # FSDP: the whole weights, gathered by every process; else None
    if procs.main:  # every process holds the same weights
        algo.models.save(out, states)
    if uses_lora(config) and config.merge:  # also a plain HF folder of the policy, for tools that take no adapter
        write_merged(out, algo.models.tokenizer, lambda: load_causal_lm(
            config.model, config.dtype, config.trust_remote_code, config.attn_implementation))
    if procs.main:
        write_model_card(out, config, algorithm.stage)
    barrier(procs)  # the model folder is whole before any process moves on
    return out
