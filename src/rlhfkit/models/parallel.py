"""Gradients summed over processes: PyTorch's DistributedDataParallel, or FSDP2 (`fully_shard`), around whatever
a loss does with a model.

A loss here is not `model(batch)`: it runs the trunk and a head, a fused LM head over a tail of positions, a
reference next to it. DDP must see the forward that builds the graph, so it wraps `LossForward`, a module whose
forward calls `loss(model, *args)`: the model's parameters are DDP's, the computation is the loss's own.
FSDP2 wraps the same module as its root: each decoder layer is sharded on its own (gathered just before its
forward and backward, freed after), and the weights outside the layers (embeddings, final norm, heads) are the
root's, gathered when the loss starts.

DDP and FSDP average gradients over processes. rlhfkit's losses are already normalised by the global count of
their units (tokens, pairs: `sum_across`), so the average is undone by scaling each process's loss by the number
of processes: the gradient is then the sum over processes, the one-process gradient of the whole batch.
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


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names of the model's repeated blocks (transformers' `_no_split_modules`, e.g. LlamaDecoderLayer),
    found on any submodule (under a peft wrapper, on the base model)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over all processes: each decoder layer of `model` sharded on its own, then a `LossForward` root
    holding the rest. Returns the root; `model`'s parameters are DTensor shards from here on."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = layer_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    return fully_shard(LossForward(model), mesh=mesh)


class GradientSum:
    """One process: calls the loss as it is. Several: through DDP, or FSDP2 (`strategy="fsdp"`), with the loss
    scaled for a gradient sum. Create it before the optimizer: FSDP replaces the model's parameters."""

    def __init__(self, model: torch.nn.Module, procs: Processes, device: torch.device, strategy: str = "ddp"):
        self.model, self.procs, self.ddp, self.fsdp = model, procs, None, None
        if procs.many and strategy == "fsdp":
            self.fsdp = shard_model(model, device)
        elif procs.many:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a loss may leave trainable weights out of a step (a head unused by one
            # batch); DDP then marks them ready instead of waiting for their gradients forever.
            self.ddp = DistributedDataParallel(LossForward(model), find_unused_parameters=True,
                                               device_ids=[device.index] if device.type == "cuda" else None)

    @property
    def sharded(self) -> bool:
        return self.fsdp is not None

    @contextlib.contextmanager
    def sync(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are summed over processes only on
        the last micro-batch of an accumulation window (DDP's no_sync, FSDP's requires_gradient_sync(False) on
        the others)."""
        if self.fsdp is not None:
            self.fsdp.set_requires_gradient_sync(last)
            yield
        elif self.ddp is None or last:
            yield
        else:
            with self.ddp.no_sync():
                yield

    @contextlib.contextmanager
    def whole(self):
        """Every weight gathered whole in every process (FSDP), e.g. to evaluate, or to save the model from the
        main process; every process must enter it. Nothing to do otherwise."""
        if self.fsdp is None:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        groups = [m for m in self.fsdp.modules() if isinstance(m, FSDPModule)]
        for group in groups:
            group.unshard()
        try:
            yield
        finally:
            for group in groups:
                group.reshard()

    def full_state_dict(self) -> dict | None:
        """FSDP: the model's whole weights, on the CPU of the main process (the other processes get an empty
        dict; every process must call it). None without FSDP: the model holds its whole weights itself."""
        if self.fsdp is None:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        first: set[int] = set()
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in first:  # a tied weight (lm_head = embed_tokens) is written once, as HF writes it
                whole.pop(name, None)
            first.add(id(param))
        return whole

    def loss(self, fn: Callable, *args):
        """(loss to log, loss to backpropagate, metrics) of `fn(model, *args)`."""
        wrapped = self.ddp if self.ddp is not None else self.fsdp
        if wrapped is None:
            loss, metrics = fn(self.model, *args)
            return loss, loss, metrics
        loss, metrics = wrapped(fn, *args)
        return loss, loss * self.procs.world, metrics


def sum_gradients(models: list[torch.nn.Module], procs: Processes, bucket_elements: int = 1 << 24) -> None:
    """Replace each trained parameter's gradient with its sum over processes (the RL loop's update).

    The RL update does not go through DDP: its roles may share one base model (LoRA: the policy and critic
    adapters sit on the same trunk, so one DDP wrapper per role would hook the other role's weights too), and a
    micro-batch runs several backward passes, one per model. So once a mini-batch's backward passes are done,
    the gradients are all-reduced here, a bucket of `bucket_elements` at a time (as DDP buckets them). A
    parameter no process has a gradient for keeps None, so the optimizer skips it as one process would; one
    that only some processes have a gradient for gets the sum, zeros standing in for the missing ones.
    """
    if not procs.many:
        return
    seen, params = set(), []
    for model in models:  # roles on one base share parameters: each is reduced once
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in groups.items():
        start = 0
        while start < len(group):
            bucket, size = [], 0
            while start < len(group) and (not bucket or size + group[start].numel() <= bucket_elements):
                bucket.append(group[start])
                size += group[start].numel()
                start += 1
            # the gradients, then one flag per parameter: how many processes had a gradient for it
            flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype,
                                                                                         device=device)
                                for p in bucket),
                              torch.tensor([float(p.grad is not None) for p in bucket], dtype=dtype, device=device)])
            torch.distributed.all_reduce(flat)
            offset = 0
            for p, had in zip(bucket, flat[size:].tolist()):
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone() if had > 0 else None
                offset += n
