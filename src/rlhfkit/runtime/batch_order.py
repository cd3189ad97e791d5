"""The seeded order in which a loop visits its examples (or prompts), as a pure function of the batch number."""

from __future__ import annotations

import math

import torch


class BatchOrder:
    """Batch number i -> example indices. Epoch e uses its own seeded permutation, so the order is a pure
    function of (seed, i): resuming at batch i needs nothing but i."""

    def __init__(self, n_examples: int, batch_size: int, seed: int, drop_last: bool = False):
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        # drop_last: every batch is full (RL wants a fixed rollout size); the tail of an epoch is skipped.
        self.per_epoch = max(1, n_examples // batch_size) if drop_last else math.ceil(n_examples / batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, microbatch: int) -> list[int]:
        epoch, within = divmod(microbatch, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator).tolist()
        return self._perm[within * self.batch_size:(within + 1) * self.batch_size]
