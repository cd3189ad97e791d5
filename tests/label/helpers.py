"""Labelling-project fixtures built straight from the store API (no model), and a live server: `rlhfkit label
serve` as a subprocess on 127.0.0.1 and a free port, stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rlhfkit.label.auth import add_annotator
from rlhfkit.label.store import Store, create_project

SCRIPT = "<script>alert(1)</script>"


def make_items(n: int, k: int = 3) -> list[dict]:
    """n items of k responses; item 1's second response is a script tag, which must show as text."""
    items = []
    for i in range(n):
        responses = [f"Answer {chr(65 + j)} to question {i + 1}." for j in range(k)]
        if i == 0:
            responses[1] = f"Try this: {SCRIPT} <b>bold?</b>"
        items.append({"prompt": f"Question {i + 1}: how do I water a cactus?", "responses": responses})
    return items


def make_project(folder: Path, n: int = 5, k: int = 3, overlap: int = 1, lease_seconds: int = 1800,
                 guidelines: str = "Prefer the helpful answer.\nTies are fine.") -> Path:
    return create_project(Path(folder) / "labels.sqlite", make_items(n, k), overlap=overlap,
                          guidelines=guidelines, lease_seconds=lease_seconds)


def tokens(project: Path, *names: str, admin: str | None = None) -> dict[str, str]:
    store = Store(project)
    out = {name: add_annotator(store, name) for name in names}
    if admin:
        out[admin] = add_annotator(store, admin, "admin")
    store.close()
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`rlhfkit label serve PROJECT` in a subprocess, on 127.0.0.1."""

    def __init__(self, project: Path, *extra: str):
        self.project = Path(project)
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.project.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 60.0) -> "Server":
        import httpx

        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlhfkit", "label", "serve", str(self.project), "--port", str(self.port),
                 *self.extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout} s: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine loses its process."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]
