"""Resumable checkpoints under `output_dir/checkpoints/step-N/`, written atomically.

A checkpoint holds everything needed to continue as if never stopped: the model (a HF safetensors folder),
the optimizer and scheduler states, the RNG states (torch, Python, NumPy) and the trainer's position
(step, epoch, micro-batch within the epoch). It is written into a temporary folder that is renamed into
place only when complete, so a crash mid-write leaves the previous checkpoint as the newest one. Its
`manifest.json` lists the size and SHA-256 of every file; on resume a checkpoint that no longer matches
(a truncated or altered file, a disk error) is reported and the previous intact one is used.
Loading uses `torch.load(weights_only=True)`: nothing in a checkpoint is unpickled as code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rlhfkit.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (the hidden folders of interrupted writes and deletions are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    """Size and SHA-256 of every file of a checkpoint folder (about 1.8 GB/s, so ~2 s for a PPO one)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in files}}


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (a missing, truncated or altered file), or None if intact.
    Folders written before checkpoints carried a manifest are accepted unverified."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if (path / "trainer_state.json").is_file() else "no trainer_state.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({exc})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def discard_interrupted(output_dir: Path) -> None:
    """Delete what a process killed while writing or deleting a checkpoint left behind (`.tmp-step-N`,
    `.del-step-N`). Only for the one process that trains into `output_dir`: at resume or before a save."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for stale in root.iterdir():
            if stale.name.startswith((".tmp-step-", ".del-step-")):
                shutil.rmtree(stale, ignore_errors=True)


def latest_good_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    """The newest intact checkpoint; a damaged newer one is reported and skipped. None if there are none;
    a UserError if there are some but none is intact (starting over silently would lose the run).
    Called when a run resumes, it first clears the leftovers of the killed run's interrupted writes."""
    discard_interrupted(output_dir)
    found = list_checkpoints(output_dir)
    problems = []
    for step, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad in problems:
                print(f"warning: skipping damaged checkpoint {bad}")
            return step, path
        problems.append(f"{path} ({problem})")
    if problems:
        raise UserError(f"{checkpoints_dir(output_dir)}: no intact checkpoint to resume from: {'; '.join(problems)}")
    return None


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict, torch_state: torch.Tensor) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_checkpoint(output_dir: Path, step: int, save_model: Callable[[Path], None], stateful: dict,
                    trainer_state: dict, keep_last_n: int = 0) -> Path:
    """Write checkpoint `step-{step}` atomically and prune old ones beyond `keep_last_n` (0 keeps all).

    `stateful` maps a name to anything with `state_dict()` (optimizers, schedulers, KL controllers); each
    is saved as `name.pt` and restored by `load_checkpoint` with the same names.
    """
    tmp = _start_checkpoint(output_dir, step)
    save_model(tmp / "model")
    return _finish_checkpoint(output_dir, step, tmp, stateful, trainer_state, keep_last_n)


def save_sharded_checkpoint(output_dir: Path, step: int, sharded, stateful: dict, trainer_state: dict,
                            keep_last_n: int, procs) -> Path:
    """Every process writes its part of the model and the optimizer into `sharded/` with torch.distributed.checkpoint
    (`sharded.save`, runtime/sharded_state.py: under FSDP its shards; under DDP a share of the replicated tensors,
    each written once); the main process writes the rest and makes the checkpoint whole, atomically, as
    `save_checkpoint` does. Every process must call it."""
    from rlhfkit.runtime.distributed import barrier

    tmp = _start_checkpoint(output_dir, step) if procs.main else checkpoints_dir(output_dir) / f".tmp-step-{step}"
    barrier(procs)  # the folder exists
    sharded.save(tmp / "sharded")
    final = _finish_checkpoint(output_dir, step, tmp, stateful, trainer_state, keep_last_n) if procs.main \
        else checkpoints_dir(output_dir) / f"step-{step}"
    barrier(procs)  # the checkpoint is whole
    return final


def _start_checkpoint(output_dir: Path, step: int) -> Path:
    """An empty temporary folder for checkpoint `step` (leftovers of an interrupted write cleared first)."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    discard_interrupted(output_dir)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir()
    return tmp


def _finish_checkpoint(output_dir: Path, step: int, tmp: Path, stateful: dict, trainer_state: dict,
                       keep_last_n: int) -> Path:
    """The small states, RNG and manifest into `tmp`, synced, then `tmp` renamed to `step-{step}` (the one
    atomic step that makes it count) and old checkpoints pruned."""
    for name, obj in stateful.items():
        torch.save(obj.state_dict(), tmp / f"{name}.pt")
    torch.save(torch.get_rng_state(), tmp / "rng_torch.pt")
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # sampling on a GPU draws from its own RNG
        torch.save(torch.cuda.get_rng_state_all(), tmp / "rng_cuda.pt")
    state = dict(trainer_state, step=step, rng=rng_state())
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    final = checkpoints_dir(output_dir) / f"step-{step}"
    if final.exists():
        _delete(final)
    os.replace(tmp, final)
    if keep_last_n > 0:
        for _, old in list_checkpoints(output_dir)[:-keep_last_n]:
            _delete(old)
    return final


def _delete(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves it either whole or gone: it is first
    renamed out of the `step-N` names (one atomic step), then deleted file by file."""
    doomed = folder.with_name(f".del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(path: Path, stateful: dict) -> dict:
    """Restore each named object's state and the RNG from a checkpoint folder; return its trainer state.
    The model weights are loaded by the caller (it knows the model class) from `path / 'model'`."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        for name, obj in stateful.items():
            obj.load_state_dict(torch.load(path / f"{name}.pt", weights_only=True))
        set_rng_state(state["rng"], torch.load(path / "rng_torch.pt", weights_only=True))
        if (path / "rng_cuda.pt").is_file() and torch.cuda.is_available():
            cuda_states = torch.load(path / "rng_cuda.pt", weights_only=True, map_location="cpu")
            for index, cuda_state in enumerate(cuda_states[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot resume from this checkpoint: {exc}") from exc
    return state


def load_model_weights(model, folder: Path) -> None:
    """Copy weights saved by `save_pretrained` in `folder` into `model` (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: checkpoint has no safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are saved once; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{folder}: checkpoint does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
