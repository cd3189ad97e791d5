"""`metrics.jsonl`: one JSON object per logged step, kept consistent across resumes."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rlhfkit.runtime.distributed import processes

# Called with (path of the log, row) after every row written: how experiment trackers (rlhfkit.track) see the
# metrics of any stage without the stages knowing them. Registered with `listening`.
_LISTENERS: list[Callable[[Path, dict], None]] = []


@contextmanager
def listening(listener: Callable[[Path, dict], None]) -> Iterator[None]:
    """Call `listener(path, row)` for every row any MetricsLog writes inside the block."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def _lines(path: Path) -> list[tuple[str, dict]]:
    """Each line of a JSONL file with its row. A last line without its newline that does not parse is the
    row a killed process was appending: it is dropped, that step was never completely logged."""
    lines = Path(path).read_text().split("\n")
    last = lines.pop()  # "" when the file ends with a newline
    found = [(line, json.loads(line)) for line in lines if line.strip()]
    if last.strip():
        try:
            found.append((last, json.loads(last)))
        except ValueError:
            pass
    return found


class MetricsLog:
    """Appends rows to `path`. On resume from step S, rows after S are dropped first, so a step that ran
    before the crash but after the checkpoint is logged once, not twice. The file is rewritten through a
    temporary file and a rename, so a process killed while it is rewritten loses no row."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        # Several processes log the same (reduced) rows: the main one writes them.
        self.enabled = processes().main
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line, row in _lines(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as handle:
                handle.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in row.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(plain) + "\n")
        for listener in list(_LISTENERS):
            listener(self.path, plain)


def read_metrics(path: Path) -> list[dict]:
    return [row for _, row in _lines(path)]
