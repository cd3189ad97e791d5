"""Deterministic train / held-out splits."""

from __future__ import annotations

import json
import random
from typing import Callable


def split_records(records: list, eval_fraction: float, seed: int,
                  key: Callable[[dict], object] | None = None) -> tuple[list, list]:
    """Hold out about `eval_fraction` of the records, chosen with `seed` (same seed, same split).

    With `key`, records sharing a key (e.g. the same prompt) land on the same side, so a prompt seen in
    training is never scored as "held out". At least one group is held out when the fraction is > 0 and
    there are 2+ groups. Order within each side is the input order.
    """
    keyed = [json.dumps(key(r), sort_keys=True) if key else i for i, r in enumerate(records)]
    groups = list(dict.fromkeys(keyed))
    if eval_fraction <= 0 or len(groups) < 2:
        return list(records), []
    random.Random(seed).shuffle(groups)
    n_eval = min(len(groups) - 1, max(1, round(eval_fraction * len(groups))))
    held = set(groups[:n_eval])
    train = [r for r, k in zip(records, keyed) if k not in held]
    evals = [r for r, k in zip(records, keyed) if k in held]
    return train, evals
