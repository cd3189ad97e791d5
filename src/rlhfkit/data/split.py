"""Deterministic train / held-out splits."""

from __future__ import annotations

import random


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle a copy with `seed` and hold out round(eval_fraction * n) records (at least 1 when the
    fraction is > 0 and there are 2+ records). The same seed always gives the same split."""
    if eval_fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(eval_fraction * len(records))))
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals
