"""Stopping a training run cleanly on SIGTERM (preemption, `kill`) or Ctrl-C (SIGINT).

The handler only records the request; the trainer finishes the step it is in, writes a checkpoint and raises
`TrainingStopped`, so nothing is cut in the middle of an optimizer step or a checkpoint write, and
`--resume` continues exactly. A second Ctrl-C while the step finishes stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class TrainingStopped(Exception):
    """A run stopped on a signal after writing a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} written; "
                         f"continue with --resume")


class StopRequest:
    def __init__(self):
        self.signum: int | None = None


@contextmanager
def stop_on_signals():
    """Yields a `StopRequest` whose `signum` is set when SIGTERM or SIGINT arrives (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        request.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
