"""Gradients summed over processes: PyTorch's DistributedDataParallel, or FSDP2 (`fully_shard`), around whatever
a loss does with a model.

A loss here is not `model(batch)`: it runs the trunk and a head, a fused LM head over a tail of positions, a
reference next to it. DDP must see the forward that builds the graph, so it wraps `LossForward`, a module whose
forward calls `loss(model, *args)`: the model's parameters are DDP's, the computation is the loss's own.
FSDP2 wraps the same module as its root: each decoder layer is sharded on its own (gathered just before its
forward and backward, freed after), and the weights outside the layers (embeddings, final norm, heads) are the
root's, gathered when the loss starts.

The RL update (PPO, GRPO, RLOO) reaches its trained roles through `TrainedRoles`: with DDP every process holds
whole models and the gradients are summed after the backward passes (`sum_gradients`); with FSDP each role's
base is sharded once, a loss runs through its root, and a rollout holds the bases whole (`gathered_whole`), so
that generation, whose processes run different numbers of forwards, needs no collective per token.

The frozen models a rollout scores with (a reference, a reward model of their own) are whole in every process by
default; with `fsdp_frozen: shard` they are sharded too (`FrozenModels`), and a rollout gathers them whole only
for their own scoring pass, after the trained models are sharded again: no process holds every model whole at
once, and between rollouts each holds 1/N of the frozen ones.

DDP and FSDP average gradients over processes. rlhfkit's losses are already normalised by the global count of
their units (tokens, pairs: `sum_across`), so the average is undone by scaling each process's loss by the number
of processes: the gradient is then the sum over processes, the one-process gradient of the whole batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from rlhfkit.models.roles import on_shared_base
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


def is_sharded(tensor: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor) rather than a plain tensor."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole_state_dict(model: torch.nn.Module) -> dict:
    """A sharded model's whole weights, on the CPU of the main process (the other processes get an empty dict;
    every process must call it). FSDP's state_dict always gives shards, even while the weights are gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:  # a tied weight (lm_head = embed_tokens) is written once, as HF writes it
            whole.pop(name, None)
        first.add(id(param))
    return whole


def start_root(root: torch.nn.Module) -> torch.nn.Module:
    """A no-op forward through a new FSDP root (every process: it gathers the root's weights): FSDP settles
    which module is the root on the first forward, which must pass through the root before any inner module is
    called on its own (a rollout calls the model, not the root). Returns the root."""
    with torch.no_grad():
        root(lambda model: None)
    root.reshard()  # the root keeps its own weights gathered after a forward: shard them (an optimizer built
    # next must see the sharded parameters)
    return root


@contextlib.contextmanager
def gathered_whole(roots: list[torch.nn.Module]):
    """Every weight under these FSDP roots whole in every process, for no-grad forwards that each process runs
    on its own (a rollout: generation ends when a process's own rows end, a process may have no rows at all).

    One all-gather per sharded unit on entry (every process must enter, roots in the same order); inside, no
    unit reshards after its forward, so forwards gather nothing and need no peer. On exit every unit is
    sharded again and FSDP's per-iteration bookkeeping (the order of the forwards it recorded, for prefetching
    in the next backward) is cleared with `reset_iter_state`, so the update's first backward prefetches only
    what its own forward ran. The roots must have run a forward (`start_root`)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in units if all(m is not root for root in roots)]
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.reset_iter_state()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)


def fsdp_rollouts_supported() -> bool:
    """`gathered_whole` needs FSDPModule.reset_iter_state (torch 2.13)."""
    from torch.distributed.fsdp import FSDPModule

    return hasattr(FSDPModule, "reset_iter_state")


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
        """Every weight gathered whole in every process (FSDP), to evaluate: once on entry, so that the forwards
        inside need no peer and each process can run its own share of the held-out batches (`gathered_whole`;
        every process must enter it). Nothing to do otherwise."""
        if self.fsdp is None:
            yield
            return
        with gathered_whole([self.fsdp]):
            yield

    def full_state_dict(self) -> dict | None:
        """FSDP: the model's whole weights, on the CPU of the main process (the other processes get an empty
        dict; every process must call it). None without FSDP: the model holds its whole weights itself."""
        return whole_state_dict(self.model) if self.fsdp is not None else None

    def loss(self, fn: Callable, *args):
        """(loss to log, loss to backpropagate, metrics) of `fn(model, *args)`."""
        wrapped = self.ddp if self.ddp is not None else self.fsdp
        if wrapped is None:
            loss, metrics = fn(self.model, *args)
            return loss, loss, metrics
        loss, metrics = wrapped(fn, *args)
        return loss, loss * self.procs.world, metrics


class TrainedRoles:
    """The RL update's trained roles (name -> model: "policy", "critic") on one or several processes.

    - One process, or `strategy="ddp"`: every process holds whole models; a loss runs on the role itself, and
      `reduce_gradients` sums the gradients over processes once a mini-batch's backward passes are done.
    - `strategy="fsdp"`: each distinct base is sharded with FSDP2 once (LoRA roles share their base, and so
      its root); a loss runs through its base's root, scaled by the number of processes for FSDP's mean, and
      the update runs in lockstep: every process takes as many forwards and backwards as the busiest one
      (`lockstep`). A trained tensor outside the sharded bases (a LoRA critic's value head) is averaged over
      processes in `reduce_gradients`, which with the scaled loss is the same sum.
    Create it before the optimizers: FSDP replaces the sharded parameters."""

    def __init__(self, roles: dict[str, torch.nn.Module], procs: Processes, device: torch.device,
                 strategy: str = "ddp"):
        self.roles, self.procs = roles, procs
        self.lockstep = procs.many and strategy == "fsdp"
        # role name -> the FSDP root of its base
        self.roots = self._once_per_base(lambda base: start_root(shard_model(base, device))) if self.lockstep else {}

    def _once_per_base(self, fn: Callable) -> dict:
        """role name -> fn(its base), computed once for each distinct base (LoRA roles share one)."""
        done, out = {}, {}
        for name, role in self.roles.items():
            base = getattr(role, "shared_base", role)  # a LoRA role: the base it shares
            if id(base) not in done:
                done[id(base)] = fn(base)
            out[name] = done[id(base)]
        return out

    def owners(self) -> torch.nn.ModuleDict:
        """One module that holds every trained tensor under a stable name (each distinct base, and a role's own
        head outside it), for checkpoints that name tensors (runtime/sharded_state.py)."""
        owners, seen = {}, set()
        for name, role in self.roles.items():
            base = getattr(role, "shared_base", role)
            if id(base) not in seen:
                seen.add(id(base))
                owners[name] = base
            if base is not role and hasattr(role, "score"):
                owners[f"{name}_head"] = role.score
        return torch.nn.ModuleDict(owners)

    def loss(self, name: str, fn: Callable):
        """(loss to log, loss to backpropagate, metrics) of `fn(role)`, `fn` returning (loss, metrics)."""
        role = self.roles[name]
        if not self.lockstep:
            loss, metrics = fn(role)
            return loss, loss, metrics
        loss, metrics = self.roots[name](lambda _base: fn(role))
        return loss, loss * self.procs.world, metrics

    def reduce_gradients(self) -> None:
        """After a mini-batch's backward passes: each process's gradients become the whole mini-batch's."""
        if not self.lockstep:
            sum_gradients(list(self.roles.values()), self.procs)
            return
        plain = [p for p in _trained_parameters(list(self.roles.values())) if not is_sharded(p)]
        _sum_parameter_gradients(plain, self.procs)
        for p in plain:
            if p.grad is not None:
                p.grad.div_(self.procs.world)

    def full_state_dicts(self) -> dict[str, dict] | None:
        """FSDP: each role's whole weights (a LoRA role: its base's, adapters included) on the CPU of the main
        process, for saving (every process must call it). None without FSDP: the models hold them."""
        return self._once_per_base(whole_state_dict) if self.lockstep else None

    @contextlib.contextmanager
    def gathered(self):
        """The trained models whole in every process for a rollout (every process must enter; see
        `gathered_whole`); nothing to do without FSDP."""
        if not self.lockstep:
            yield
            return
        roots = list({id(r): r for r in self.roots.values()}.values())
        with gathered_whole(roots):
            yield


class FrozenModels:
    """The frozen models an RL rollout scores with (name -> model: "reference", "reward model"), whole in every
    process, or with `shard` (and several processes) each sharded over them by FSDP2 like a trained model.

    A role on a trained base (LoRA: the reference is the base with its adapters off) is not a model of its own
    and is left out: it is sharded, or not, with that base. `gathered()` holds the sharded ones whole for a
    scoring pass (one all-gather per sharded unit, as `gathered_whole`), so scoring, whose processes run
    different numbers of forwards, needs no collective per forward."""

    def __init__(self, models: dict[str, torch.nn.Module | None], procs: Processes, device: torch.device,
                 shard: bool = False):
        own = {name: m for name, m in models.items() if m is not None and not on_shared_base(m)}
        self.names = list(own) if shard and procs.many else []
        self.roots = [start_root(shard_model(own[name], device)) for name in self.names]

    @property
    def sharded(self) -> bool:
        return bool(self.roots)

    @contextlib.contextmanager
    def gathered(self):
        """The sharded frozen models whole in every process (every process must enter); nothing to do otherwise."""
        if not self.roots:
            yield
            return
        with gathered_whole(self.roots):
            yield


def _trained_parameters(models: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for model in models:  # roles on one base share parameters: each is listed once
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def sum_gradients(models: list[torch.nn.Module], procs: Processes, bucket_elements: int = 1 << 24) -> None:
    """Replace each trained parameter's gradient with its sum over processes (the RL loop's update).

    The RL update does not go through DDP: its roles may share one base model (LoRA: the policy and critic
    adapters sit on the same trunk, so one DDP wrapper per role would hook the other role's weights too), and a
    micro-batch runs several backward passes, one per model. So once a mini-batch's backward passes are done,
    the gradients are all-reduced here, a bucket of `bucket_elements` at a time (as DDP buckets them). A
    parameter no process has a gradient for keeps None, so the optimizer skips it as one process would; one
    that only some processes have a gradient for gets the sum, zeros standing in for the missing ones.
    """
    if procs.many:
        _sum_parameter_gradients(_trained_parameters(models), procs, bucket_elements)


def _sum_parameter_gradients(params: list[torch.nn.Parameter], procs: Processes,
                             bucket_elements: int = 1 << 24) -> None:
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
