"""Which device a stage runs on, and moving batches there.

`device` is one of:
- ``auto`` (the default): the first CUDA GPU when torch sees one (``cuda:0``), else the CPU. Apple's MPS is
  used only when asked for: several ops our losses use still fall back to the CPU there;
- ``cpu``, ``cuda`` (the current CUDA device, ``cuda:0`` unless CUDA_VISIBLE_DEVICES says otherwise),
  ``cuda:N`` or ``mps``.

A stage resolves its device first (`resolve_device`), records the resolved name in its config.yaml, and
everything it loads, collates and samples then lives there: models are moved on load, batches with
`to_device`, and tensors a loop creates follow the batch they belong to. The precision choice
(runtime/precision.py) then depends on this device's type.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rlhfkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def parse_device(requested: str) -> tuple[str, int | None]:
    """The kind ('auto', 'cpu', 'cuda', 'mps') and CUDA index of a `device` setting, checked for spelling only (a
    config may name a device this machine lacks: `rlhfkit plan` reads it, another machine runs it)."""
    match = _PATTERN.match(str(requested).strip().lower())
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"key 'device': {requested!r} is not a device (choose from {DEVICE_CHOICES})")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def choose_device(requested: str) -> tuple[torch.device, str]:
    """Resolve `requested` into a torch.device and a one-line reason; a device this machine lacks is a
    ConfigError naming the key and what torch sees."""
    import torch

    kind, index = parse_device(requested)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0), f"'auto' chose cuda:0 ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "'auto' chose the CPU: torch sees no CUDA GPU"
    if kind == "cpu":
        return torch.device("cpu"), "device is 'cpu'"
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("key 'device': 'mps' was asked for, but torch sees no Apple GPU (MPS) here")
        return torch.device("mps"), "device is 'mps'"
    if not torch.cuda.is_available():
        built = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise ConfigError(f"key 'device': {requested!r} was asked for, but {built}; use 'cpu' or 'auto'")
    number = torch.cuda.current_device() if index is None else index
    count = torch.cuda.device_count()
    if number >= count:
        raise ConfigError(f"key 'device': {requested!r} was asked for, but torch sees {count} CUDA "
                          f"device{'s' if count != 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", number), f"device is {requested!r} ({torch.cuda.get_device_name(number)})"


def resolve_device(config) -> torch.device:
    """Replace `config.device` by the resolved device's name (so that config.yaml records where the stage ran),
    make it the current CUDA device when it is one, and print the choice in one line. Every stage calls this
    before `resolve_precision`, which depends on the device's type."""
    import torch

    from rlhfkit.runtime.distributed import init_processes, processes

    requested = getattr(config, "device", "cpu")
    procs = processes()
    if procs.many and requested.startswith("cuda:"):
        raise ConfigError(f"key 'device': {requested!r} would put all {procs.world} processes on one GPU; under a "
                          f"launcher give 'auto' or 'cuda' (each process takes the GPU of its LOCAL_RANK)")
    if procs.many and requested in ("auto", "cuda") and torch.cuda.is_available():
        requested = f"cuda:{procs.local_rank}"  # one GPU per process, as the launcher numbered them
    device, reason = choose_device(requested)
    init_processes(device.type)
    config.device = str(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels and the caching allocator default to it
    print(f"device: {device}: {reason}")
    return device


def stage_device(config) -> torch.device:
    """The device a stage resolved (config.device after `resolve_device`; the CPU for configs without one)."""
    import torch

    return torch.device(getattr(config, "device", None) or "cpu")


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A collated batch with every tensor on `device`; other values as they are."""
    import torch

    return {key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a model's weights live: its input embeddings' device (an HF model, or a LoRA role whose own
    parameters are only its adapter's, or none for the reference), else its first parameter's; else the CPU."""
    import torch

    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.device
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
