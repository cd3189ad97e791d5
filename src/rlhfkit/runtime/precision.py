"""Which precision a stage runs in, and the autocast contexts that apply it.

`mixed_precision` is one of:
- ``auto`` (the default): bf16 where the hardware runs bf16 matmuls natively; on a CUDA GPU without it (T4,
  V100), fp16 with a dynamic loss scaler; fp32 ('no') otherwise;
- ``bf16``: forward passes under bf16 autocast, weights and optimizer state in fp32;
- ``fp16``: forward passes under fp16 autocast, and the loss scaled up before backward (dynamically, as
  torch.amp.GradScaler does) so that small gradients do not flush to zero in fp16; a step whose gradient
  overflowed is skipped, the scale halved, and the skip counted in `train/skipped_steps`;
- ``no``: fp32 throughout.

Why not bf16 everywhere: many x86-64 CPUs (AVX2 without AVX512-BF16 or AMX) have no bf16 instructions, and
torch then falls back to a reference kernel about 100x slower than its fp32 GEMM (1024 x 1024: 0.6 against
64 GFLOP/s on a 2-core AVX2 machine). On a CPU with AVX512-BF16/AMX, bf16 runs about 2-3x faster than fp32.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """oneDNN's own check: AVX512-BF16 or AMX on x86-64 (BF16 instructions on Arm)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def cuda_has_native_bf16() -> bool:
    """A CUDA GPU that runs bf16 in hardware (Ampere and later); T4 and V100 only emulate it."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation; it reports native support only
        return bool(torch.cuda.is_bf16_supported())


def has_native_bf16(device_type: str) -> bool:
    return cuda_has_native_bf16() if device_type == "cuda" else cpu_has_native_bf16()


@dataclass(frozen=True)
class PrecisionChoice:
    mode: str      # 'no', 'bf16' or 'fp16': what the stage runs in
    reason: str    # one line: why

    def describe(self) -> str:
        name = {"bf16": "bf16 autocast (fp32 weights and optimizer state)",
                "fp16": "fp16 autocast with a dynamic loss scaler (fp32 weights and optimizer state)"}.get(self.mode, "fp32")
        return f"precision: {name}: {self.reason}"


_warned_emulated: set[str] = set()


def choose_precision(requested: str, device_type: str = "cpu") -> PrecisionChoice:
    """Resolve `mixed_precision` ('auto', 'no' or 'bf16') for `device_type` into 'no' or 'bf16', with the reason.

    An explicit 'bf16' on hardware that only emulates it is honoured (the user asked), with a warning, once per
    process, that it is far slower."""
    if requested not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {requested!r}")
    where = "this GPU" if device_type == "cuda" else "this CPU"
    native = has_native_bf16(device_type)
    what = ("native bf16 (compute capability >= 8.0)" if device_type == "cuda"
            else "native bf16 (AVX512-BF16/AMX, per oneDNN)")
    if requested == "auto":
        if native:
            return PrecisionChoice("bf16", f"'auto' chose bf16: {where} has {what}")
        if device_type == "cuda":
            return PrecisionChoice("fp16", f"'auto' chose fp16: {where} has no {what} (a T4 or V100), but runs fp16 "
                                           f"on its tensor cores")
        return PrecisionChoice("no", f"'auto' chose fp32: {where} has no {what}, so bf16 would be emulated "
                                     f"and far slower")
    if requested == "no":
        return PrecisionChoice("no", "mixed_precision is 'no'")
    if requested == "fp16":
        return PrecisionChoice("fp16", "mixed_precision is 'fp16'" + ("" if device_type == "cuda" else
                                                                      " (on the CPU, fp16 matmuls are slower than fp32)"))
    if not native and device_type not in _warned_emulated:
        _warned_emulated.add(device_type)
        warnings.warn(f"mixed_precision 'bf16': {where} has no {what}; bf16 is emulated there and runs far slower "
                      f"than fp32 (about 100x for matmuls on AVX2 CPUs). 'auto' would choose fp32.",
                      RuntimeWarning, stacklevel=2)
    return PrecisionChoice("bf16", "mixed_precision is 'bf16'" + ("" if native else f" (emulated on {where})"))


def resolve_precision(config, device_type: str = "cpu") -> PrecisionChoice:
    """Replace `config.mixed_precision` by the resolved mode (so that config.yaml records what ran) and print the
    choice and its reason in one line. Every stage calls this first."""
    choice = choose_precision(config.mixed_precision, device_type)
    config.mixed_precision = choice.mode
    print(choice.describe())
    return choice


def autocast(mode: str, device_type: str = "cpu"):
    """A context in which forward passes run in `mode` ('no', 'bf16' or 'fp16', as resolved by `choose_precision`)."""
    if mode == "no":
        return contextlib.nullcontext()
    if mode in ("bf16", "fp16"):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)
    raise ValueError(f"autocast mode must be 'no', 'bf16' or 'fp16' (resolve 'auto' first), got {mode!r}")


def autocast_paused(device_type: str = "cpu"):
    """Autocast off inside an autocast context (for backward passes), keeping that context's cast cache."""
    return torch.autocast(device_type=device_type, enabled=False)


class LossScaler:
    """fp16's dynamic loss scaling around backward and the optimizer steps (torch.amp.GradScaler); in fp32 and
    bf16, whose range needs no scaling, a pass-through.

    Per update: `backward(loss)` for each loss; `unscale(optimizer)` for each optimizer before clipping (the
    gradients are then true-sized); `overflowed(norm, ...)`: the scaled gradients overflowed fp16, so this update
    must be skipped; `step(optimizer)` for each optimizer that steps; `update()` once (halves the scale after an
    overflow, doubles it after `growth_interval` good steps). Its state travels in checkpoints (exact resume)."""

    def __init__(self, mode: str, device_type: str = "cpu"):
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if mode == "fp16" else None

    @property
    def active(self) -> bool:
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        with autocast_paused(self.device_type):  # backward runs in the dtypes the forward chose
            (self.scaler.scale(loss) if self.active else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.active:
            self.scaler.unscale_(optimizer)

    def overflowed(self, *grad_norms: float) -> bool:
        import math

        return self.active and not all(math.isfinite(n) for n in grad_norms)

    def step(self, optimizer) -> None:
        if self.active:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.active:
            self.scaler.update()

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale()) if self.active else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.active else {}

    def load_state_dict(self, state: dict) -> None:
        if self.active and state:
            self.scaler.load_state_dict(state)
