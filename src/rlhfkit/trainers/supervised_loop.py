"""The supervised training loop shared by SFT and reward-model training.

A trainer hands the loop a `SupervisedTask` (model, tokenised examples, collate, loss) and the loop does the
rest the same way for every stage: a seeded order of micro-batches, gradient accumulation normalised over the
whole accumulation window, clipping, AdamW with warm-up + decay, metrics.jsonl, evaluation every N steps,
atomic checkpoints every N steps, and resume from the newest one.

Under a launcher (torchrun, accelerate launch) with N processes, `batch_size` stays global: each micro-batch of
the seeded order is split over the processes, the loss is normalised by the window's global count of units, and
the gradients are summed over processes (models/parallel.py), so N processes take the same steps as one. With
`distributed: fsdp` the model is sharded with FSDP2 and checkpoints are written sharded, by every process
(torch.distributed.checkpoint); the final model is gathered and written whole by the main process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.errors import UserError
from rlhfkit.runtime.device import stage_device
from rlhfkit.runtime.precision import LossScaler, autocast
from rlhfkit.runtime.batch_order import BatchOrder
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.distributed import barrier, my_share, processes, sum_across
from rlhfkit.runtime.guard import NonFiniteGuard
from rlhfkit.runtime.interrupt import stop_on_signals
from rlhfkit.runtime.model_card import write_model_card
from rlhfkit.models.parallel import GradientSum
from rlhfkit.runtime.sharded_state import ShardedState
from rlhfkit.trainers.optim import build_optimizer, build_scheduler, clip_gradients
from rlhfkit.trainers.run_context import RunContext


@dataclass
class SupervisedTask:
    model: torch.nn.Module
    train_examples: list
    collate: Callable[[list], dict]  # examples -> a batch of tensors on the stage's device
    # loss(model, batch, normaliser) -> (loss, metrics). `normaliser` counts the loss units (completion
    # tokens, pairs) of the whole accumulation window, so summed micro-batch losses equal one big batch's.
    loss: Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict]]
    units: Callable[[dict], float]
    save_model: Callable[..., None]  # (folder, state_dict=None): state_dict, FSDP's whole weights, gathered
    load_model: Callable[[Path], None]  # the weights save_model wrote, back into the model (resume)
    evaluate: Callable[[], dict] | None = None
    lr_overrides: dict[str, float] | None = None


def held_out_batches(n_examples: int, batch_size: int, max_batches: int = 0) -> int:
    """How many batches of `batch_size` a held-out evaluation runs over `n_examples` (at most `max_batches`, when
    set); batch k holds examples k * batch_size onwards. Each process evaluates its share of them
    (runtime.distributed.sum_over_shares)."""
    n = math.ceil(n_examples / batch_size)
    return min(n, max_batches) if max_batches else n


def total_steps(config, n_examples: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(n_examples / config.batch_size)
    return max(1, math.ceil(config.num_epochs * per_epoch / config.gradient_accumulation_steps))


def run_supervised(task: SupervisedTask, config, output_dir: Path, desc: str) -> list[dict]:
    """Train to the configured number of steps; return the logged rows of this run."""
    if not task.train_examples:
        raise UserError("no training examples left after tokenisation")
    seed_everything(config.seed)
    order = BatchOrder(len(task.train_examples), config.batch_size, config.seed)
    steps = total_steps(config, len(task.train_examples))
    procs = processes()
    # DDP or FSDP under a launcher; before the optimizer, whose parameters FSDP's shards are
    parallel = GradientSum(task.model, procs, stage_device(config), config.distributed)
    optimizer = build_optimizer(task.model, config, task.lr_overrides)
    scheduler = build_scheduler(optimizer, config, steps)
    guard = NonFiniteGuard(config.max_bad_steps)
    device_type = stage_device(config).type  # the task's collate puts batches there
    scaler = LossScaler(config.mixed_precision, device_type)  # fp16's dynamic loss scale; a pass-through otherwise
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "guard": guard}
    if scaler.active:
        stateful["loss_scaler"] = scaler
    # Checkpoints by torch.distributed.checkpoint on several processes, and on one under distributed: fsdp (so that
    # it continues on several); plain files from one process otherwise
    run = RunContext(config, output_dir, steps, guard, stateful, sharded=ShardedState(task.model, optimizer),
                     shard_writes=procs.many or config.distributed == "fsdp", reads_plain=not parallel.sharded)
    state = run.resume(task.load_model)
    step, microbatch = (state["step"], state["microbatch"]) if state is not None else (0, 0)
    log = run.log("metrics")
    params = [p for p in task.model.parameters() if p.requires_grad]
    accum = config.gradient_accumulation_steps
    rows, bar = [], run.start_progress(step, desc)
    task.model.train()
    # SIGTERM / Ctrl-C: finish the step, write a checkpoint, stop (see runtime/interrupt.py).
    with stop_on_signals() as run.stop:
        while step < steps:
            started = time.perf_counter()
            batches, real = [], []
            for k in range(accum):
                indices = order.indices(microbatch + k)
                mine = my_share(indices, procs)
                # A process with no share of a micro-batch (fewer examples than processes) still takes part in
                # the gradient sum, with a stand-in example whose loss counts zero.
                batches.append(task.collate([task.train_examples[i] for i in mine or indices[:1]]))
                real.append(bool(mine))
            microbatch += accum
            units = [float(task.units(b)) if r else 0.0 for b, r in zip(batches, real)]
            normaliser = max(sum_across([sum(units)], procs)[0], 1.0)  # the window's units over all processes
            totals: dict[str, float] = {}
            loss_sum = 0.0
            # One autocast context per optimizer step: autocast keeps its bf16 copy of each weight until the
            # context exits, so the micro-batches share one cast, and the next step's forward sees new weights.
            with autocast(config.mixed_precision, device_type):
                for k, (batch, weight) in enumerate(zip(batches, units)):
                    with parallel.sync(last=k == accum - 1):
                        loss, backprop, metrics = parallel.loss(task.loss, batch, normaliser)
                        # in the dtypes the forward chose; fp16: the loss scaled first
                        scaler.backward(backprop if real[k] else backprop * 0.0)
                    loss_sum += loss.item() if real[k] else 0.0
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * weight / normaliser
            if procs.many:  # each process summed its share: the step's loss and metrics are their sums
                loss_sum, *sums = sum_across([loss_sum, *totals.values()], procs)
                totals = dict(zip(totals, sums))
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            scaler.unscale(optimizer)  # fp16: true-sized gradients before clipping
            grad_norm = clip_gradients(params, max_norm)
            if math.isfinite(loss_sum) and scaler.overflowed(grad_norm):
                guard.overflow()  # the scale was too large for fp16: skip, and the scaler halves it
            elif guard.allows(loss_sum, grad_norm):
                scaler.step(optimizer)
                scheduler.step()
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            n_examples = sum(len(order.indices(microbatch - accum + k)) for k in range(accum))
            row = {"step": step, "epoch": microbatch / order.per_epoch, "loss": loss_sum,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, **totals,
                   "train/skipped_steps": guard.skipped, **({"train/loss_scale": scaler.scale} if scaler.active else {}),
                   "time/step_s": elapsed, "perf/samples_per_s": n_examples / max(elapsed, 1e-9)}
            evaluating = task.evaluate is not None and (step == steps or (config.eval_every and step % config.eval_every == 0))
            if evaluating:
                task.model.eval()
                with torch.no_grad(), autocast(config.mixed_precision, device_type), parallel.whole():
                    row.update({f"eval/{k}": v for k, v in task.evaluate().items()})
                task.model.train()
            logged = evaluating or step % config.log_every == 0 or step == steps
            if logged:
                log.write(row)
                rows.append(row)
            if guard.exhausted and not logged:
                log.write(row)
            run.stop_if_exhausted(f"steps {step - guard.in_a_row + 1}-{step}: {guard.in_a_row} steps in a row had a "
                                  f"non-finite loss or gradient and were skipped; stopping (max_bad_steps). "
                                  f"Checkpoints in {output_dir}/checkpoints are intact; lower the learning rate "
                                  f"or check the data")
            run.checkpoint_when_due(step, task.save_model, {"microbatch": microbatch, "total_steps": steps})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", samples_s=f"{row['perf/samples_per_s']:.1f}")
    run.close_progress()
    task.model.eval()
    whole = parallel.full_state_dict()  # FSDP: the whole weights, gathered in the main process; else None
    if procs.main:
        task.save_model(output_dir, whole)
        write_model_card(output_dir, config, desc)
    barrier(procs)  # the model folder is whole before any process moves on (a merge, the next stage)
    return rows
