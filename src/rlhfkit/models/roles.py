"""Roles on one shared base: the same frozen weights serve as policy, reference and critic, each through its own
adapter (models/lora.py), so a PPO run holds one base instead of three full models.

A `Role` looks like the model it stands for to every code path that takes a plain HF model (rollout/scoring.py,
rollout/generate.py): `role.base_model(...)` runs the trunk, `role(...)` the whole LM, `role.config`,
`role.get_output_embeddings()`, and a critic's `role.score` head. Each call switches the base to the role's
adapter for exactly that call and switches back after, so no role sees another's path. `parameters()` are the
role's own trainable tensors (its adapter, its head): an optimizer built on a role steps only that role.
"""

from __future__ import annotations

import contextlib

import torch

from rlhfkit.models import lora


class Role(torch.nn.Module):
    """`base` through adapter `adapter` (None: the base alone, adapters off), plus an optional scalar `score`
    head (a critic's value head). The base is shared, not owned: it is not a submodule of the role."""

    def __init__(self, base: torch.nn.Module, adapter: str | None, score: torch.nn.Module | None = None):
        super().__init__()
        object.__setattr__(self, "shared_base", base)  # not registered: roles must not own each other's weights
        self.adapter = adapter
        if score is not None:
            self.score = score

    @property
    def config(self):
        return self.shared_base.config

    @property
    def name_or_path(self):
        return self.shared_base.name_or_path

    def get_output_embeddings(self):
        return self.shared_base.get_output_embeddings()

    def get_input_embeddings(self):
        return self.shared_base.get_input_embeddings()

    @property
    def base_model(self):
        """The trunk, called through this role's adapter."""
        trunk = self.shared_base.base_model

        def run(*args, **kwargs):
            with lora.using(self.shared_base, self.adapter):
                return trunk(*args, **kwargs)
        return run

    def forward(self, *args, **kwargs):
        with lora.using(self.shared_base, self.adapter):
            return self.shared_base(*args, **kwargs)

    @contextlib.contextmanager
    def merged(self):
        """For sampling: this role as a plain model, its adapter merged into the base's weights for the duration
        (lora.merged_weights), which are the same tensors again after; itself where they cannot be merged (a bf16
        base, FSDP). The reference role is itself already."""
        if self.adapter is None:
            yield self
            return
        with lora.merged_weights(self.shared_base, self.adapter) as merged:
            yield Role(self.shared_base, None) if merged else self

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The role's own tensors: its adapter's (requires_grad) and its head's."""
        if self.adapter is not None:
            marker = f".{self.adapter}."
            for name, param in self.shared_base.named_parameters():
                if marker in name:
                    yield prefix + name, param
        if hasattr(self, "score"):
            for name, param in self.score.named_parameters():
                yield f"{prefix}score.{name}", param

    def parameters(self, recurse: bool = True):
        for _, param in self.named_parameters():
            yield param

    def train(self, mode: bool = True):
        # The base's mode decides gradient checkpointing (transformers checkpoints only in training mode, and
        # turns the KV cache off while it does); dropout is off in every rlhfkit model. The roles take turns:
        # the update trains (policy, critic), the rollout samples and scores in eval mode.
        super().train(mode)
        self.shared_base.train(mode)
        return self

    def state_dict(self, *args, **kwargs):
        return {name: param.detach() for name, param in self.named_parameters()}

    def load_state_dict(self, state, strict: bool = True):
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise RuntimeError(f"role '{self.adapter}': missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                if name in own:
                    own[name].copy_(value)
        return missing, unexpected


def on_shared_base(model) -> bool:
    """Whether `model` is a role on a shared (LoRA) base rather than a model of its own: a LoRA reference or reward
    model scores with the trained base, wherever that base is (whole, or gathered from its FSDP shards)."""
    return isinstance(model, Role)
