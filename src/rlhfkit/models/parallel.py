"""Gradients summed over processes: PyTorch's DistributedDataParallel around whatever a loss does with a model.

A loss here is not `model(batch)`: it runs the trunk and a head, a fused LM head over a tail of positions, a
reference next to it. DDP must see the forward that builds the graph, so it wraps `LossForward`, a module whose
forward calls `loss(model, *args)`: the model's parameters are DDP's, the computation is the loss's own.

DDP averages gradients over processes. rlhfkit's losses are already normalised by the global count of their
units (tokens, pairs: `sum_across`), so the average is undone by scaling each process's loss by the number of
processes: the gradient is then the sum over processes, the one-process gradient of the whole batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from rlhfkit.runtime.distributed import Processes


class LossForward(torch.nn.Module):
    """`forward(loss, *args)` = `loss(model, *args)`, so that DDP prepares its reduction for that graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss: Callable, *args):
        return loss(self.model, *args)


class GradientSum:
    """One process: calls the loss as it is. Several: through DDP, with the loss scaled for a gradient sum."""

    def __init__(self, model: torch.nn.Module, procs: Processes, device: torch.device):
        self.model, self.procs, self.ddp = model, procs, None
        if procs.many:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a loss may leave trainable weights out of a step (a head unused by one
            # batch); DDP then marks them ready instead of waiting for their gradients forever.
            self.ddp = DistributedDataParallel(LossForward(model), find_unused_parameters=True,
                                               device_ids=[device.index] if device.type == "cuda" else None)

    def sync(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are summed over processes only on
        the last micro-batch of an accumulation window (DDP's no_sync on the others)."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def loss(self, fn: Callable, *args):
        """(loss to log, loss to backpropagate, metrics) of `fn(model, *args)`."""
        if self.ddp is None:
            loss, metrics = fn(self.model, *args)
            return loss, loss, metrics
        loss, metrics = self.ddp(fn, *args)
        return loss, loss * self.procs.world, metrics
