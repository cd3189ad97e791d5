"""runtime.distributed's sums over processes, with the collective faked: what each process computes, and what it
gets back (the real collectives run in tests/trainers/test_distributed.py)."""

import rlhfkit.runtime.distributed as dist
from rlhfkit.runtime.distributed import Processes, sum_over_shares


def test_a_process_evaluates_every_nth_batch_and_gets_every_process_sums(monkeypatch):
    calls = []

    def batch(k):
        calls.append(k)
        return {"loss": 10.0 * k, "pairs": 3}

    process_0 = {"loss": 0.0 + 20.0 + 40.0, "pairs": 9.0}  # batches 0, 2 and 4
    seen = []
    monkeypatch.setattr(dist, "all_gather", lambda value, procs: seen.append(value) or [process_0, value])
    assert sum_over_shares(5, batch, Processes(rank=1, world=2)) == {"loss": 100.0, "pairs": 15.0}
    assert calls == [1, 3] and seen == [{"loss": 40.0, "pairs": 6.0}]  # its own batches only, then the sums

    calls.clear()  # one process: every batch, no collective
    monkeypatch.setattr(dist, "all_gather", lambda value, procs: 1 / 0)
    assert sum_over_shares(5, batch, Processes()) == {"loss": 100.0, "pairs": 15.0} and calls == [0, 1, 2, 3, 4]


def test_a_process_with_no_batch_still_joins_and_gets_the_others_sums(monkeypatch):
    monkeypatch.setattr(dist, "all_gather", lambda value, procs: [{"nll": 2.5, "tokens": 4.0}, value, value])
    assert sum_over_shares(1, lambda k: 1 / 0, Processes(rank=2, world=3)) == {"nll": 2.5, "tokens": 4.0}
