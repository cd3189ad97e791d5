"""One process or several: the process group, who this process is, and the few global reductions a loop needs.

A launcher (`torchrun --nproc-per-node N -m rlhfkit sft ...`, or `accelerate launch -m rlhfkit sft ...`) starts N
copies of the command and tells each its place through the environment (WORLD_SIZE, RANK, LOCAL_RANK and the
rendezvous address). Without a launcher there is one process, no process group, and every function here is the
identity: the single-process path is the same code with N = 1.

The rules the loops follow (what peers have got wrong at times):
- batch sizes are global: each step's batch is split over the processes (`my_share`), so a config means the same
  thing on any number of them;
- losses are normalised by global counts (`sum_across`), and the gradients summed over processes, so N processes
  take the same step as one process with the same global batch;
- metrics are reduced before they are logged, and only the main process (rank 0) writes files.
The backend is gloo on the CPU and NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Processes:
    rank: int = 0        # this process's place among all, 0 .. world - 1
    world: int = 1       # how many processes run the stage
    local_rank: int = 0  # its place on this machine: the CUDA device it takes

    @property
    def main(self) -> bool:
        """The process that writes files and prints results."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1


def processes() -> Processes:
    """This process's place, from the launcher's environment (one process when there is none)."""
    return Processes(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init_processes(device_type: str) -> Processes:
    """Join the process group when a launcher started several processes (once per process)."""
    procs = processes()
    if procs.many and not torch.distributed.is_initialized():
        # A peer that died leaves the others waiting in a collective: fail within minutes rather than hang for
        # the default 30 (torchrun tears the job down when one process exits with an error anyway).
        timeout = datetime.timedelta(seconds=float(os.environ.get("RLHFKIT_DIST_TIMEOUT_S", 600)))
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return procs


def one_process_only(command: str) -> None:
    """Stop a command that runs in one process (the pipeline and the demo) before it does anything, rather than
    let each process run every stage on its own."""
    from rlhfkit.errors import UserError

    procs = processes()
    if procs.many:
        raise UserError(f"{command} runs in one process ({procs.world} were launched); run it without torchrun or "
                        f"accelerate launch, or launch its stages one by one: sft, reward, dpo, ppo, grpo, rloo, "
                        f"annotate and eval each run under them")


def my_share(indices: list[int], procs: Processes) -> list[int]:
    """This process's part of a global batch: every world-th example from its rank on (shares differ in size
    by at most one; a process gets none when the batch has fewer examples than there are processes)."""
    return indices[procs.rank::procs.world]


def my_samples(n_prompts: int, k: int, procs: Processes) -> list[int]:
    """Global indices of this process's samples when each of `n_prompts` prompts has k samples in a row: its
    share of the prompts (`my_share`), each prompt's k samples together (a group never straddles processes)."""
    return [p * k + j for p in my_share(list(range(n_prompts)), procs) for j in range(k)]


def _reduce(values: list[float], op) -> list[float]:
    """`values` reduced element-wise over all processes with `op`, in float64 (counts and metric sums stay
    exact enough to compare with one process's), on the device the backend communicates from."""
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    reduced = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(reduced, op=op)
    return reduced.tolist()


def sum_across(values: list[float], procs: Processes) -> list[float]:
    """Element-wise sums over all processes."""
    return _reduce(values, torch.distributed.ReduceOp.SUM) if procs.many else list(values)


def max_across(value: float, procs: Processes) -> float:
    """The largest `value` over all processes."""
    return _reduce([value], torch.distributed.ReduceOp.MAX)[0] if procs.many else value


def all_gather(value, procs: Processes) -> list:
    """Every process's `value` (anything picklable), in rank order; [value] for one process."""
    if not procs.many:
        return [value]
    gathered: list = [None] * procs.world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def sum_dicts_across(sums: dict[str, float], procs: Processes) -> dict[str, float]:
    """Each process's sums, added key by key over all processes (a process with no share may have no keys)."""
    if not procs.many:
        return dict(sums)
    totals: dict[str, float] = {}
    for part in all_gather(sums, procs):
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def sum_over_shares(n_batches: int, fn: Callable[[int], dict[str, float]],
                    procs: Processes | None = None) -> dict[str, float]:
    """Batches 0 .. n_batches - 1 dealt out over the processes (`my_share`: batch k to process k mod N); each
    process adds up `fn(k)` over its own batches, and every process gets the sums over all of them. A held-out
    evaluation so costs each of N processes 1/N of the forwards, and gives one process's numbers (up to the order
    of the float sums). Every process must call it, one with no batch too."""
    procs = procs or processes()
    totals: dict[str, float] = {}
    for k in my_share(list(range(n_batches)), procs):
        for key, value in fn(k).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return sum_dicts_across(totals, procs)


def finish_processes() -> None:
    """Leave the process group at the end of a command (torch warns about one left open at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(procs: Processes) -> None:
    """Wait for every process (e.g. until the main one has written a checkpoint that the others will read)."""
    if procs.many:
        torch.distributed.barrier()
