"""Summary statistics with uncertainty, for evaluation reports."""

from __future__ import annotations

import math

import torch

# Two-sided 95% quantile of the standard normal. With n >= 30 the t quantile is within 4% of it; for
# smaller n the interval is somewhat too narrow, which the report states by giving n beside every interval.
Z95 = 1.959963984540054


def mean_ci95(values: torch.Tensor) -> dict:
    """Mean of `values` (N,) with a normal-approximation 95% interval: mean +- 1.96 * s / sqrt(N), where s
    is the Bessel-corrected standard deviation. N = 1 gives a zero-width interval; N = 0 gives NaNs."""
    x = values.double().flatten()
    n = x.numel()
    if n == 0:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "std": math.nan, "n": 0}
    mean = x.mean().item()
    std = x.std(unbiased=True).item() if n > 1 else 0.0
    half = Z95 * std / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "std": std, "n": n}


def win_rate(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per-pair outcome (N,): 1 where ours > theirs, 0.5 on ties, 0 where ours < theirs."""
    return (ours > theirs).double() + 0.5 * (ours == theirs).double()
