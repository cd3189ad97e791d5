"""Device lists for the planner: `5xT4`, `1xA100-80GB`, `2xH100`, `cpu:24GB`, `2xgpu:24GB`.

Sizes are in GiB (2**30 bytes; `GB` is read the same way, as nvidia-smi and `free -g` quote memory). A GPU's
`memory_gib` is what PyTorch reports as its total memory (smaller than the marketing number: ECC and the driver
keep some), less than which the allocator can never hand out; from it the planner also keeps back the CUDA
context and library workspaces, which `torch.cuda.max_memory_allocated` does not count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhfkit.errors import UserError

GIB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces and the kernels' own images: outside PyTorch's allocator, about 0.3-0.6
# GiB per process depending on the driver and libraries (kept back from every GPU).
CUDA_CONTEXT_GIB = 0.5


@dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_gib: float     # total memory as torch.cuda.get_device_properties(i).total_memory reports it
    bf16: bool            # runs bf16 matmuls natively (Ampere and later)
    fp16: bool = True


# Approximate totals as PyTorch reports them (what out-of-memory messages call "total capacity").
GPUS: dict[str, DeviceKind] = {k.name: k for k in (
    DeviceKind("T4", 14.75, bf16=False),
    DeviceKind("V100-16GB", 15.77, bf16=False),
    DeviceKind("V100-32GB", 31.74, bf16=False),
    DeviceKind("P100", 15.89, bf16=False),
    DeviceKind("A10G", 22.0, bf16=True),
    DeviceKind("A10", 22.0, bf16=True),
    DeviceKind("L4", 22.0, bf16=True),
    DeviceKind("RTX3090", 23.69, bf16=True),
    DeviceKind("RTX4090", 23.64, bf16=True),
    DeviceKind("L40S", 44.4, bf16=True),
    DeviceKind("A100-40GB", 39.39, bf16=True),
    DeviceKind("A100-80GB", 79.15, bf16=True),
    DeviceKind("H100", 79.1, bf16=True),
    DeviceKind("H200", 139.8, bf16=True),
)}
GPU_ALIASES = {"V100": "V100-16GB", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB", "H100-80GB": "H100",
               "H200-141GB": "H200", "3090": "RTX3090", "4090": "RTX4090"}


@dataclass(frozen=True)
class Device:
    index: int            # position in the list (cuda:index for GPUs)
    kind: str             # 'cpu' or a GPU name
    total_gib: float
    bf16: bool
    fp16: bool

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def label(self) -> str:
        return "cpu" if self.is_cpu else f"cuda:{self.index} ({self.kind})"

    @property
    def usable_bytes(self) -> int:
        """What tensors may take: the total, less the CUDA context on a GPU."""
        reserve = 0.0 if self.is_cpu else CUDA_CONTEXT_GIB
        return int((self.total_gib - reserve) * GIB)


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GB|GIB|G|TB|TIB|T)?$", re.IGNORECASE)


def _size_gib(text: str, where: str) -> float:
    match = _SIZE.match(text.strip())
    if not match:
        raise UserError(f"--devices '{where}': '{text}' is not a size (write e.g. 24GB)")
    value = float(match.group(1))
    unit = (match.group(2) or "GB").upper()
    gib = value * 1024 if unit.startswith("T") else value
    if gib <= 0:
        raise UserError(f"--devices '{where}': the size must be positive")
    return gib


def _gpu_kind(name: str, where: str) -> DeviceKind:
    upper = {k.upper(): k for k in GPUS}
    key = name.upper().replace("_", "-").replace(" ", "")
    key = {a.upper(): b for a, b in GPU_ALIASES.items()}.get(key, upper.get(key))
    if key is None:
        if name.upper() == "A100":
            raise UserError(f"--devices '{where}': A100 comes in two sizes: write A100-40GB or A100-80GB")
        raise UserError(f"--devices '{where}': unknown device '{name}' (known: cpu:SIZE, gpu:SIZE, "
                        f"{', '.join(GPUS)})")
    return GPUS[key]


def parse_devices(text: str) -> list[Device]:
    """`5xT4`, `1xA100-80GB`, `2xH100`, `cpu:24GB`, `2xgpu:24GB` (a GPU of that size with bf16), or several
    groups joined by '+', e.g. `4xT4+1xV100-32GB`."""
    if not text or not text.strip():
        raise UserError("--devices is required, e.g. --devices 5xT4, 1xA100-80GB or cpu:24GB")
    devices: list[Device] = []
    for group in text.split("+"):
        group = group.strip()
        match = re.match(r"^(?:(\d+)\s*[xX*]\s*)?(.+)$", group)
        count = int(match.group(1)) if match and match.group(1) else 1
        name = match.group(2).strip() if match else group
        if count < 1:
            raise UserError(f"--devices '{group}': the count must be at least 1")
        if name.lower() == "cpu":
            raise UserError(f"--devices '{group}': give the CPU's memory, e.g. cpu:24GB")
        if name.lower().startswith("cpu:"):
            if count != 1 or any(d.is_cpu for d in devices):
                raise UserError(f"--devices '{group}': one CPU at most (its memory is the host's RAM)")
            gib = _size_gib(name[4:], group)
            devices.append(Device(len(devices), "cpu", gib, bf16=False, fp16=False))
            continue
        if name.lower().startswith("gpu:"):
            gib = _size_gib(name[4:], group)
            kind = DeviceKind(f"gpu-{gib:g}GB", gib, bf16=True)
        else:
            kind = _gpu_kind(name, group)
        gpus = sum(not d.is_cpu for d in devices)
        for _ in range(count):
            devices.append(Device(gpus, kind.name, kind.memory_gib, kind.bf16, kind.fp16))
            gpus += 1
    if any(d.is_cpu for d in devices) and len(devices) > 1:
        raise UserError(f"--devices '{text}': plan either GPUs or the CPU (CPU offload is one of the suggestions)")
    return devices


def describe(devices: list[Device]) -> str:
    groups: dict[str, int] = {}
    for d in devices:
        groups[d.kind] = groups.get(d.kind, 0) + 1
    parts = []
    for kind, n in groups.items():
        d = next(x for x in devices if x.kind == kind)
        parts.append(f"cpu with {d.total_gib:g} GiB" if kind == "cpu" else f"{n}x {kind} ({d.total_gib:g} GiB each)")
    return " + ".join(parts)
