"""`metrics.jsonl`: one JSON object per logged step, kept consistent across resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsLog:
    """Appends rows to `path`. On resume from step S, rows after S are dropped first, so a step that ran
    before the crash but after the checkpoint is logged once, not twice."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
