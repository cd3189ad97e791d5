"""The run context every training loop carries: its config and output folder, what checkpoints save, the
non-finite guard, the metrics log, the progress bar and the stop flag that SIGTERM / Ctrl-C set.

The supervised loop (SFT, reward, DPO) and the RL loop (PPO, GRPO, RLOO) both resume, log, stop on too many
non-finite updates and checkpoint through these methods, so the rules (which checkpoint is intact, when one is
due, what a signal does) are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhfkit.errors import UserError
from rlhfkit.runtime.checkpoint import latest_good_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from rlhfkit.runtime.distributed import barrier, max_across, processes
from rlhfkit.runtime.guard import NonFiniteGuard
from rlhfkit.runtime.interrupt import StopRequest, TrainingStopped
from rlhfkit.runtime.metrics_log import MetricsLog


@dataclass
class RunContext:
    config: Any                    # the stage's resolved config (rlhfkit.config)
    out: Path                      # its output folder
    total: int                     # optimizer steps (supervised) or iterations (RL) to run
    guard: NonFiniteGuard          # skipped updates, saved in every checkpoint
    stateful: dict                 # name -> object with state_dict()/load_state_dict(), saved in checkpoints
    unit: str = "step"             # what `total` counts, for messages: "step" or "iteration"
    resumed_from: int | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    bar: Any = None                # tqdm progress bar, once started
    logs: dict[str, MetricsLog] = field(default_factory=dict)
    # The model and optimizer as torch.distributed.checkpoint reads and writes them (runtime/sharded_state.py):
    # checkpoints hold them in `sharded/` when `shard_writes` (several processes, or distributed: fsdp on one), and
    # any run can resume from such a one. A checkpoint of one process's plain files (model/, optimizer.pt) resumes
    # only where the models hold whole weights (`reads_plain`: not FSDP over several processes).
    sharded: Any = None
    shard_writes: bool = False
    reads_plain: bool = True

    # -- resume ------------------------------------------------------------------------------------------
    def resume(self, load_weights: Callable[[Path], None]) -> dict | None:
        """With --resume, restore the model weights (`load_weights(checkpoint / "model")`) and every stateful
        object from the newest intact checkpoint; return its trainer state (None when starting afresh)."""
        found = latest_good_checkpoint(self.out) if self.config.resume else None
        if not found:
            if self.config.resume:
                print(f"no checkpoint in {self.out / 'checkpoints'}; starting from {self.unit} 0")
            return None
        self.resumed_from, path = found
        stateful = self.stateful
        if (path / "sharded").is_dir():  # written by DCP: read back into this run's layout
            if self.sharded is None:
                raise UserError(f"{path}: a sharded checkpoint (FSDP), which this stage cannot read")
            self.sharded.load(path / "sharded")
            stateful = {k: v for k, v in stateful.items() if k not in self.sharded.covers}
        elif not self.reads_plain:
            raise UserError(f"{path}: written by one process with distributed: ddp; resume it with ddp, or start "
                            f"afresh in another output_dir")
        else:
            load_weights(path / "model")
        state = load_checkpoint(path, stateful)
        print(f"resuming from {path} ({self.unit} {state['step']} of {self.total})")
        return state

    # -- logs and progress -------------------------------------------------------------------------------
    def log(self, name: str = "metrics") -> MetricsLog:
        """`out/NAME.jsonl`, with the rows after the resumed checkpoint dropped (they are written again)."""
        if name not in self.logs:
            self.logs[name] = MetricsLog(self.out / f"{name}.jsonl", resume_step=self.resumed_from)
        return self.logs[name]

    def start_progress(self, initial: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=initial, desc=desc, disable=not self.config.progress,
                        dynamic_ncols=True)
        return self.bar

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def stop_if_exhausted(self, message: str) -> None:
        """After max_bad_steps non-finite updates in a row: stop with one line (checkpoints stay intact)."""
        if self.guard.exhausted:
            self.close_progress()
            raise UserError(message)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_when_due(self, step: int, save_model: Callable[[Path], None], extra: dict) -> None:
        """Checkpoint every save_every steps, at the end (unless checkpoint_at_end is off), and when a signal
        asked to stop (then raise TrainingStopped, which the CLI turns into exit status 128 + the signal
        number)."""
        procs = processes()
        if procs.many:
            # A launcher signals each process on its own, each at its own point of the step: they agree, once
            # per step, to stop if any was asked to, so that all of them checkpoint and leave together.
            agreed = int(max_across(float(self.stop.signum or 0), procs))
            self.stop.signum = agreed or None
        stopping = self.stop.signum is not None and step < self.total
        every = self.config.save_every
        at_end = step == self.total and self.config.checkpoint_at_end
        if at_end or stopping or (every and step % every == 0):
            # DCP: each process writes its part (FSDP: its shards; DDP: its share of the replicated tensors, each
            # written once), the main one the rest. One process alone writes plain files.
            if self.shard_writes:
                small = {k: v for k, v in self.stateful.items() if k not in self.sharded.covers}
                saved = save_sharded_checkpoint(self.out, step, self.sharded, small, extra, self.config.keep_last_n,
                                                procs)
            else:
                saved = save_checkpoint(self.out, step, save_model, self.stateful, extra, self.config.keep_last_n) \
                    if procs.main else self.out / "checkpoints" / f"step-{step}"
                barrier(procs)
            if stopping:
                self.close_progress()
                raise TrainingStopped(self.stop.signum, step, saved)
