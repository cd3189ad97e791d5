"""Tolerances that follow the dtype and the size of what is summed, not one machine's rounding.

Two computations of the same fp32 quantity by different kernels (a chunked head against the full logits, a batch
against a row alone, an AVX2 GEMM against an AVX-512 one) differ by their rounding errors. For a reduction of n
terms whose absolute values add up to about `scale`, each kernel's error is at most about n * eps * scale in the
worst case and, for the blocked and pairwise sums that BLAS and torch's reductions use, about sqrt(n) * eps * scale
in practice (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sections 3.1 and 4.2). Two kernels
can err in opposite directions, and a value usually passes through more than one reduction (the logits' dot
products of `hidden` terms, then the vocabulary's logsumexp), so the bound below adds the reductions' sizes and
allows a factor of 4 over the typical case, while staying orders of magnitude below any real bug (a wrong token,
a missing mask, a wrong temperature moves a log-prob by 1e-2 or more).
"""

from __future__ import annotations

import math

import torch


def reduction_atol(dtype: torch.dtype, *sizes: int, scale: float = 1.0) -> float:
    """Absolute tolerance for a value that went through reductions of `sizes` terms, of total magnitude `scale`."""
    eps = torch.finfo(dtype).eps
    return 4.0 * eps * sum(math.sqrt(n) for n in sizes) * max(scale, 1.0)


def close(actual: torch.Tensor, expected: torch.Tensor, *sizes: int, scale: float | None = None) -> None:
    """assert_close with `reduction_atol` for the dtype of the tensors; `scale` defaults to max |expected|."""
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    atol = reduction_atol(expected.dtype, *sizes, scale=scale)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
