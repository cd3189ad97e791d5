"""Test-only launcher: run the real `rlhfkit` CLI and SIGKILL it at an exact point, or serve such runs.

    python tests/trainers/kill_at.py [--kill SPEC] -- sft --preset tiny ...   # one run, then exit
    python tests/trainers/kill_at.py --zygote                                  # serve runs (see below)

SPEC is `EVENT:SUBSTR:N`: the process kills itself with SIGKILL (nothing runs after it: no `finally`, no
atexit, no flush) at the N-th event whose file path contains SUBSTR (counted from the process's start):

    open      right after a file is opened for writing (a 'w' file is then empty)
    torn      the file's first write() puts only the first half of its data on disk, then the kill
    closed    right after a file opened for writing is closed (its content complete)
    save      right before a `torch.save` to that path
    replace   right before an `os.replace` whose destination is that path
    replaced  right after it
    rmtree    a `shutil.rmtree` of that path deletes about half of the files, then the kill

Several `--kill` options may be given; the first to fire kills. `os.fsync` is a no-op here: it only
matters for a power cut, never for a killed process (the page cache survives it), and it costs seconds.

`--zygote` imports torch, transformers and rlhfkit once and then forks one child per request, so that a
test pays the imports (3 to 11 s, by CPU) once instead of once per run. Each request is one JSON line on
stdin, {"argv": [...], "kill": [SPEC, ...], "log": PATH}; the zygote answers {"pid": PID} as soon as the child
runs (a test may SIGKILL that pid itself at any moment) and {"status": S} when it ended (S: the exit code,
or minus the signal that ended it). The zygote runs no torch operation itself, so a child starts without
any thread pool inherited from it. Children run `rlhfkit.cli.main(argv)`, exactly what the console script runs.

A request may also carry:
  "err"     a file for the child's stderr (default: "log", with its stdout)
  "env"     variables set in the child before it runs (os.environ; read at run time, as rlhfkit reads them)
  "cwd"     the folder the child runs in
  "path"    folders whose sitecustomize.py the child runs first, as Python does at start for PYTHONPATH
  "world"   N > 1: N children, each given the environment torchrun gives its processes (RANK, LOCAL_RANK,
            WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: a free port), with "log" and "err"
            holding `{rank}` for files per process. The answers always carry every child, {"pid": PID of
            rank 0, "pids": [...]} and {"status": S, "statuses": [...]}, S being the first failure's (in time,
            0 if none failed). As torchrun does, the first process to fail brings the others down (SIGKILL),
            so that none waits for it in a collective.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, specs):
        self.specs = []
        for spec in specs:
            event, substr, n = spec.split(":")
            self.specs.append([event, substr, int(n)])

    def hit(self, event, path) -> bool:
        """True when this event on `path` is the N-th one a spec waits for."""
        path = os.fspath(path) if not isinstance(path, int) else ""
        fired = False
        for spec in self.specs:
            if spec[0] == event and spec[1] in str(path) and spec[2] > 0:
                spec[2] -= 1
                fired = fired or spec[2] == 0
        return fired

    def wants(self, event) -> bool:
        return any(spec[0] == event for spec in self.specs)


class _TornFile:
    """A write-mode file whose first write is cut in half by the kill."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[:max(1, len(data) // 2)])
        self._handle.flush()
        _die()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


class _ClosingFile(_TornFile):
    """A write-mode file that kills the process once it is closed."""

    def write(self, data):
        return self._handle.write(data)

    def close(self):
        self._handle.close()
        _die()

    def __exit__(self, *exc):
        self._handle.__exit__(*exc)
        _die()


def install(specs: list[str]) -> None:
    counter = _Counter(specs)
    os.fsync = lambda fd: None
    real_open = builtins.open

    def hooked_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+"):
            return handle
        if counter.hit("open", file):
            _die()
        if counter.hit("torn", file):
            return _TornFile(handle)
        if counter.hit("closed", file):
            return _ClosingFile(handle)
        return handle

    builtins.open = io.open = hooked_open

    real_replace = os.replace

    def hooked_replace(src, dst, *args, **kwargs):
        if counter.hit("replace", dst):
            _die()
        real_replace(src, dst, *args, **kwargs)
        if counter.hit("replaced", dst):
            _die()

    os.replace = hooked_replace

    real_rmtree = shutil.rmtree

    def hooked_rmtree(path, *args, **kwargs):
        if os.path.isdir(path) and counter.hit("rmtree", path):
            files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
            for file in files[::2]:
                os.unlink(file)
            _die()
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = hooked_rmtree

    if counter.wants("save"):
        import torch

        real_save = torch.save

        def hooked_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and counter.hit("save", f):
                _die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = hooked_save


def run_cli(argv: list[str], specs: list[str]) -> int:
    install(specs)
    from rlhfkit.cli import main

    return main(argv)


def _child(request: dict, rank: int = 0) -> None:
    def opened(key):
        return os.open(request[key].replace("{rank}", str(rank)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    log = opened("log")
    os.dup2(log, 1)
    os.dup2(opened("err") if request.get("err") else log, 2)
    sys.stdin = open(os.devnull)
    code = 1
    try:
        os.environ.update(request.get("env") or {})
        if request.get("cwd"):
            os.chdir(request["cwd"])
        for folder in request.get("path") or ():
            if os.path.isfile(os.path.join(folder, "sitecustomize.py")):
                import runpy

                runpy.run_path(os.path.join(folder, "sitecustomize.py"), run_name="sitecustomize")
        code = run_cli(request["argv"], request.get("kill") or [])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def zygote() -> None:
    # Everything a stage imports, imported once here; no torch operation runs in this process.
    import peft  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import rlhfkit.annotate.stage  # noqa: F401
    import rlhfkit.cli  # noqa: F401
    import rlhfkit.eval.evaluate  # noqa: F401
    import rlhfkit.trainers.dpo  # noqa: F401
    import rlhfkit.trainers.grpo  # noqa: F401
    import rlhfkit.trainers.ppo  # noqa: F401
    import rlhfkit.trainers.reward  # noqa: F401
    import rlhfkit.trainers.sft  # noqa: F401

    reply = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        world = int(request.get("world") or 1)
        port = _free_port() if world > 1 else None
        pids = []
        for rank in range(world):
            env = dict(request.get("env") or {})
            if world > 1:  # what torchrun tells each process
                env.update({k: str(v) for k, v in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world,
                                                    "LOCAL_WORLD_SIZE": world, "GROUP_RANK": 0,
                                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items()})
            pid = os.fork()
            if pid == 0:
                _child({**request, "env": env}, rank)
            pids.append(pid)
        reply.write(json.dumps({"pid": pids[0], "pids": pids}) + "\n")
        reply.flush()
        codes, first_failure = _wait_all(pids)
        reply.write(json.dumps({"status": first_failure, "statuses": codes}) + "\n")
        reply.flush()


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_all(pids: list[int]) -> tuple[list[int], int]:
    """Every child's exit code (minus the signal that ended it) in launch order, and the code of the first to
    fail (0 if none did). The first to fail kills the rest, reported as killed (-9) unless they had ended."""
    codes, first_failure = {}, 0
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, 0)
        if pid not in pids:
            continue
        codes[pid] = _exit_code(status)
        if codes[pid] != 0 and first_failure == 0:
            first_failure = codes[pid]
            for other in pids:
                if other not in codes:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    return [codes[pid] for pid in pids], first_failure


def main() -> int:
    args = sys.argv[1:]
    if args == ["--zygote"]:
        zygote()
        return 0
    specs = []
    while args and args[0] == "--kill":
        specs.append(args[1])
        args = args[2:]
    if args and args[0] == "--":
        args = args[1:]
    return run_cli(args, specs)


if __name__ == "__main__":
    sys.exit(main())
