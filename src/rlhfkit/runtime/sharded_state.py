"""A model and its optimizer in a checkpoint written by every process: torch.distributed.checkpoint (DCP).

Under FSDP each process holds a shard of every weight and of the optimizer's state, so no process can write the
whole state alone. DCP writes each process's shards (`__N_0.distcp` files plus a `.metadata` index) and reads
them back into any layout: the same number of processes, another one, or one process with whole tensors (it
reshards on load). `get_state_dict`/`set_state_dict` give the model's and the optimizer's state under the
parameters' own names, whether the model is sharded or not.

Under DDP every process holds the same whole tensors; DCP writes each of them once, the writes spread over the
processes. A `distributed: fsdp` run writes its checkpoints this way even on one process (no process group:
`no_dist`), so that a run started on one process under FSDP continues on several, as one started on several
continues on one.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ShardedState:
    """`model` (one module holding every trained tensor: the RL loop passes its roles' bases in a ModuleDict) and
    its optimizers; `covers` names the checkpoint's stateful entries this state replaces."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
                 covers: tuple[str, ...] = ("optimizer",)):
        self.model, self.optimizer, self.covers = model, optimizer, covers

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, folder: Path) -> None:
        """Every process writes its shards into `folder` (a collective: all must call it)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(folder), no_dist=_single())

    def load(self, folder: Path) -> None:
        """Read the model's and the optimizer's state from `folder`, resharded to this run's layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(folder), no_dist=_single())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def _single() -> bool:
    """No process group: DCP reads and writes every tensor in this one process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())
