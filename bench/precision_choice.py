"""`--precision auto|fp32|bf16` for the benches: one choice, applied to rlhfkit and TRL alike."""

from __future__ import annotations

# rlhfkit's mixed_precision for each bench precision (TRL's side: bf16=True for "bf16", else fp32).
MIXED = {"bf16": "bf16", "fp32": "no"}
PRECISION_WORDS = {"bf16": "bf16 autocast", "fp32": "fp32"}


def resolve_bench_precision(requested: str) -> tuple[str, str]:
    """('bf16' or 'fp32', why): 'auto' asks rlhfkit's own rule (bf16 only where the CPU runs it natively)."""
    if requested != "auto":
        return requested, "asked for"
    from rlhfkit.runtime.precision import choose_precision

    choice = choose_precision("auto")
    return ("bf16" if choice.mode == "bf16" else "fp32"), choice.reason
