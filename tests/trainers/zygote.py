"""The test side of tests/trainers/kill_at.py --zygote: runs of the real CLI forked from one process that imported
torch, transformers and rlhfkit once.

On a 2-core CPU without AVX-512 a fresh `python -m rlhfkit` spends about 11 s importing before it computes
anything (a tiny model's run then takes 2 or 3 s), and a two-process job under torchrun pays it twice plus the
launcher's own import of torch. Forked children skip all of it, and run exactly what a launched process runs:
`rlhfkit.cli.main(argv)`, with the environment torchrun gives its processes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER = Path(__file__).with_name("kill_at.py")


class Zygote:
    """Starts runs of the CLI in forked children of tests/trainers/kill_at.py --zygote."""

    def __init__(self, log: Path, timeout: float = 300):
        # One intra-op thread: as fast for a tiny model, and no slowdown when the cores are shared.
        root = str(Path(__file__).resolve().parents[2])  # reward functions and gold scorers: tests.*
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log, self.timeout = log, timeout
        self.proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _reply(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        assert line, f"the zygote died; log:\n{self.log_tail()}"
        return json.loads(line)

    def _send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def run(self, argv: list[str], kill: list[str] = (), kill_after: float | None = None) -> tuple[int, float]:
        """Run `rlhfkit <argv>`; with `kill_after`, SIGKILL it that many seconds after it started unless it
        ended before. Returns (exit status or minus the signal, seconds it ran)."""
        with open(self.log, "a") as handle:
            handle.write(f"\n$ rlhfkit {' '.join(argv)}   kill={list(kill)} after={kill_after}\n")
        self._send({"argv": argv, "kill": list(kill), "log": str(self.log)})
        started = time.perf_counter()
        pid = self._reply(60)["pid"]
        reply = self._reply(kill_after) if kill_after is not None else None
        if reply is None and kill_after is not None:
            _kill([pid])
        if reply is None:
            reply = self._reply(self.timeout)
        if reply is None:
            _kill([pid])
            raise AssertionError(f"rlhfkit {argv} ran for more than {self.timeout} s; log:\n{self.log_tail()}")
        return reply["status"], time.perf_counter() - started

    def launch(self, argv: list[str], world: int, logs: Path, env: dict | None = None, cwd: Path | None = None,
               path: tuple[str, ...] = (), timeout: float | None = None) -> subprocess.CompletedProcess:
        """`rlhfkit <argv>` in `world` processes (one: as run without a launcher), each writing its output to
        `logs`/rank-N.out and .err; returns what subprocess.run returns: the first failure's status, and every
        process's stdout and stderr, rank after rank."""
        logs.mkdir(parents=True, exist_ok=True)
        for rank in range(world):
            for kind in ("out", "err"):
                (logs / f"rank-{rank}.{kind}").write_text("")
        request = {"argv": argv, "log": str(logs / "rank-{rank}.out"), "err": str(logs / "rank-{rank}.err"),
                   "world": world, "path": list(path), "env": env or {}, "cwd": str(cwd) if cwd else None}
        self._send(request)
        started = self._reply(60)
        pids = started["pids"]
        limit = timeout or self.timeout
        reply = self._reply(limit)
        if reply is None:
            _kill(pids)
            self._reply(60)
            raise AssertionError(f"rlhfkit {argv} on {world} process(es) ran for more than {limit} s:\n"
                                 + _read(logs, world, "out")[-3000:] + _read(logs, world, "err")[-3000:])
        return subprocess.CompletedProcess(argv, reply["status"], _read(logs, world, "out"), _read(logs, world, "err"))

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.exists() else ""

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read(logs: Path, world: int, kind: str) -> str:
    return "".join((logs / f"rank-{rank}.{kind}").read_text() for rank in range(world))
