"""Skipping optimizer steps whose loss or gradient is not finite, and counting them.

One bad batch (an overflow, a NaN from a broken record) must not poison the weights or the optimizer's
moments: its update is skipped. The counts go into the metrics and, through `state_dict`, into every
checkpoint, so a resumed run counts on exactly where it stopped.
"""

from __future__ import annotations

import math


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0   # updates skipped in the whole run
        self.in_a_row = 0  # updates skipped since the last good one

    def allows(self, *values: float) -> bool:
        """Record one update given its loss and/or gradient norms: True if all are finite (take the step)."""
        finite = all(math.isfinite(value) for value in values)
        self.skipped += 0 if finite else 1
        self.in_a_row = 0 if finite else self.in_a_row + 1
        return finite

    def overflow(self) -> None:
        """An fp16 update skipped because its scaled gradient overflowed: counted with the skipped updates, but
        not towards a stop (the loss scaler lowers its scale and the next update is expected to be finite)."""
        self.skipped += 1

    @property
    def exhausted(self) -> bool:
        """Too many bad updates in a row: the run should stop (with its checkpoints intact)."""
        return self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]
