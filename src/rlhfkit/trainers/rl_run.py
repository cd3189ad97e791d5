"""What the sampling trainers (PPO, GRPO, RLOO) share around their iteration: resuming from the newest
intact checkpoint, the metrics every iteration logs, logging a row (and stopping on too many non-finite
updates), and the end-of-iteration checkpoint, which SIGTERM / Ctrl-C also asks for. Each trainer's loop
stays readable top to bottom."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from rlhfkit.errors import UserError
from rlhfkit.trainers.checkpoint import latest_good_checkpoint, load_checkpoint, save_checkpoint
from rlhfkit.trainers.guard import NonFiniteGuard
from rlhfkit.trainers.interrupt import TrainingStopped


def resume(out: Path, config, stateful: dict, generator: torch.Generator,
           load_weights: Callable[[Path], None]) -> tuple[int, int | None]:
    """With --resume, restore weights (`load_weights(checkpoint / "model")`), optimizer and other state and the
    update-order generator from the newest intact checkpoint. Returns (iteration, resumed-from step or None)."""
    found = latest_good_checkpoint(out) if config.resume else None
    if not found:
        if config.resume:
            print(f"no checkpoint in {out / 'checkpoints'}; starting from iteration 0")
        return 0, None
    resumed_from, path = found
    load_weights(path / "model")
    state = load_checkpoint(path, stateful)
    generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    print(f"resuming from {path} (iteration {state['step']} of {config.max_steps})")
    return state["step"], resumed_from


def iteration_row(step: int, metrics: dict, timings: dict, batch, train_s: float, step_s: float,
                  guard: NonFiniteGuard, models, records: list[dict], texts: list[str]) -> dict:
    """The metrics row every sampling trainer logs: the update's metrics and phase times, response lengths and
    ends, skipped updates, throughput, and the gold score of the samples when a gold scorer is loaded."""
    mask = batch.response_mask
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}, **timings,
           "response/length_mean": float(mask.sum(1).mean()),
           "response/ended_fraction": float(batch.ended.float().mean()), "time/train_s": train_s,
           "train/skipped_steps": guard.skipped, "time/step_s": step_s, "perf/samples_per_s": len(batch) / step_s}
    if models.gold is not None:
        row["objective/gold"] = sum(models.gold_scores(records, texts)) / len(texts)
    return row


def log_iteration(step: int, row: dict, config, log, guard: NonFiniteGuard, out: Path, bar, hint: str) -> None:
    """Write the row when due; after max_bad_steps non-finite mini-batches in a row, stop with one line."""
    if step % config.log_every == 0 or step == config.max_steps or guard.exhausted:
        log.write(row)
    if guard.exhausted:
        bar.close()
        raise UserError(f"iteration {step}: {guard.in_a_row} mini-batches in a row had a non-finite gradient and "
                        f"were skipped; stopping (max_bad_steps). Checkpoints in {out}/checkpoints are intact; "
                        f"lower the learning rate or {hint}")


def checkpoint_iteration(step: int, config, out: Path, stop, save: Callable[[Path], None], stateful: dict,
                         generator: torch.Generator, bar) -> None:
    """Checkpoint when due, at the end, or when a signal asked to stop (then raise TrainingStopped)."""
    stopping = stop.signum is not None and step < config.max_steps
    if step == config.max_steps or stopping or (config.save_every and step % config.save_every == 0):
        saved = save_checkpoint(out, step, save, stateful, {"generator": generator.get_state().tolist()},
                                config.keep_last_n)
        if stopping:
            bar.close()
            raise TrainingStopped(stop.signum, step, saved)
