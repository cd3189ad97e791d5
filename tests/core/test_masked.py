"""Tests for rlhfkit.core.masked: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.masked import masked_mean, masked_sum, masked_var, masked_whiten

SETTINGS = settings(max_examples=50, deadline=None)
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30, -7.0]


@st.composite
def masked_batches(draw, min_kept=0):
    """(x, mask) as float64 (B, T) tensors, values in [-100, 100], with at least `min_kept` kept entries."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    values = draw(st.lists(st.floats(-100, 100), min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    for i in range(min(min_kept, b * t)):
        mask[i] = True
    x = torch.tensor(values, dtype=torch.float64).reshape(b, t)
    return x, torch.tensor(mask).reshape(b, t)


def with_garbage(x, mask, seed=0):
    """Copy of x whose masked-out entries are NaN/inf/huge junk."""
    gen = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(len(GARBAGE), x.shape, generator=gen)]
    return torch.where(mask, x, junk)


# Naive loop references -------------------------------------------------------------------------------


def loop_kept(x, mask):
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def loop_mean(x, mask):
    kept = loop_kept(x, mask)
    return sum(kept) / len(kept) if kept else 0.0


def loop_var(x, mask, unbiased=True):
    kept = loop_kept(x, mask)
    n = len(kept)
    if n == 0:
        return 0.0
    mean = sum(kept) / n
    ss = sum((v - mean) ** 2 for v in kept)
    return ss / (n - 1) if unbiased and n > 1 else ss / n


def loop_whiten(x, mask, shift_mean=True, eps=1e-8):
    mean, var = loop_mean(x, mask), loop_var(x, mask, unbiased=True)
    out = []
    for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()):
        if not m:
            out.append(0.0)
            continue
        w = (v - mean) / math.sqrt(var + eps)
        out.append(w if shift_mean else w + mean)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


# (a) Numbers worked by hand ----------------------------------------------------------------------------

X = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
M = torch.tensor([1, 1, 0, 1])


def test_masked_sum_by_hand():
    # 1 + 2 + 4 = 7 (the 3 is masked out)
    assert masked_sum(X, M).item() == 7.0


def test_masked_mean_by_hand():
    # (1 + 2 + 4) / 3 = 7/3
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)


def test_masked_mean_along_dim_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[True, False], [True, True]])
    # rows: [1] -> 1 ; [3, 4] -> 3.5
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.0, 3.5]))
    # columns: [1, 3] -> 2 ; [4] -> 4
    torch.testing.assert_close(masked_mean(x, m, dim=0), torch.tensor([2.0, 4.0]))
    # sums: rows 1 and 7
    torch.testing.assert_close(masked_sum(x, m, dim=1), torch.tensor([1.0, 7.0]))


def test_empty_mask_mean_is_zero_not_nan():
    x = torch.tensor([[5.0, float("nan")], [1.0, 2.0]])
    m = torch.tensor([[0, 0], [1, 1]])
    # row 0 has nothing kept -> 0 ; row 1 -> 1.5
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([0.0, 1.5]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert masked_var(x, torch.zeros_like(m)).item() == 0.0


def test_masked_var_by_hand():
    # kept 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    # biased: 42/9 / 3 = 14/9 ; unbiased: 42/9 / 2 = 7/3
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_var(X, M, unbiased=True).item() == pytest.approx(7 / 3)


def test_masked_var_single_token_is_zero():
    # one kept value: no spread, and no 1/(n-1) = 1/0 blow-up
    m = torch.tensor([0, 0, 1, 0])
    assert masked_var(X, m, unbiased=True).item() == 0.0
    assert masked_var(X, m, unbiased=False).item() == 0.0


def test_masked_whiten_by_hand():
    # mean 7/3, unbiased var 7/3 -> std sqrt(7/3); masked position -> 0
    s = math.sqrt(7 / 3)
    expected = torch.tensor([(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0, (4 - 7 / 3) / s], dtype=torch.float64)
    torch.testing.assert_close(masked_whiten(X, M, eps=0.0), expected)
    # shift_mean=False adds the mean back on kept positions only
    expected_kept_mean = expected + torch.tensor([7 / 3, 7 / 3, 0.0, 7 / 3], dtype=torch.float64)
    torch.testing.assert_close(masked_whiten(X, M, shift_mean=False, eps=0.0), expected_kept_mean)


def test_float_bool_and_nonbinary_masks_agree():
    for m in (M.bool(), M.float(), M * 3, M.to(torch.float64) * 0.5):
        assert masked_mean(X, m).item() == pytest.approx(7 / 3)
        assert masked_var(X, m).item() == pytest.approx(7 / 3)


def test_mask_broadcasts():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([1, 0, 1])  # same columns kept in every row: 1 + 3 + 4 + 6 = 14 over 4
    assert masked_mean(x, m).item() == pytest.approx(3.5)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(masked_batches(), st.booleans())
def test_matches_loop_reference(batch, unbiased):
    x, m = batch
    kept = loop_kept(x, m)
    assert masked_sum(x, m).item() == pytest.approx(sum(kept), abs=1e-9)
    assert masked_mean(x, m).item() == pytest.approx(loop_mean(x, m), abs=1e-9)
    assert masked_var(x, m, unbiased=unbiased).item() == pytest.approx(
        loop_var(x, m, unbiased), rel=1e-9, abs=1e-9
    )


@SETTINGS
@given(masked_batches())
def test_mean_along_dim_matches_loop(batch):
    x, m = batch
    rows = masked_mean(x, m, dim=1)
    for i in range(x.shape[0]):
        assert rows[i].item() == pytest.approx(loop_mean(x[i], m[i]), abs=1e-9)
    cols = masked_sum(x, m, dim=0)
    for j in range(x.shape[1]):
        assert cols[j].item() == pytest.approx(sum(loop_kept(x[:, j], m[:, j])), abs=1e-9)


@SETTINGS
@given(masked_batches(), st.booleans())
def test_whiten_matches_loop(batch, shift_mean):
    x, m = batch
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=shift_mean), loop_whiten(x, m, shift_mean))


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(masked_batches(), st.integers(0, 1000))
def test_masked_garbage_changes_nothing(batch, seed):
    x, m = batch
    dirty = with_garbage(x, m, seed)
    assert torch.equal(masked_sum(dirty, m), masked_sum(x, m))
    assert torch.equal(masked_mean(dirty, m), masked_mean(x, m))
    assert torch.equal(masked_mean(dirty, m, dim=1), masked_mean(x, m, dim=1))
    assert torch.equal(masked_var(dirty, m), masked_var(x, m))
    assert torch.equal(masked_whiten(dirty, m), masked_whiten(x, m))
    assert torch.equal(masked_whiten(dirty, m, shift_mean=False), masked_whiten(x, m, shift_mean=False))


@SETTINGS
@given(masked_batches(), st.integers(0, 1000))
def test_gradients_ignore_garbage(batch, seed):
    x, m = batch
    dirty = with_garbage(x, m, seed).requires_grad_(True)
    (masked_whiten(dirty, m).pow(2).sum() + masked_mean(dirty, m) + masked_var(dirty, m)).backward()
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~m] == 0).all()


@SETTINGS
@given(masked_batches(min_kept=2))
def test_whitened_has_zero_mean_unit_variance(batch):
    x, m = batch
    if loop_var(x, m) < 1e-3:  # (near-)constant input has no scale to normalise
        return
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-9)
    # var / (var + eps) with var >= 1e-3 and eps = 1e-8
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-5)
    assert (w[~m] == 0).all()


@SETTINGS
@given(masked_batches(min_kept=2), st.floats(0.1, 10), st.floats(-50, 50))
def test_whiten_is_affine_invariant(batch, scale, shift):
    x, m = batch
    if loop_var(x, m) < 1e-3:
        return
    # eps=0: with the default eps the result depends (slightly) on the scale of x
    torch.testing.assert_close(masked_whiten(scale * x + shift, m, eps=0.0), masked_whiten(x, m, eps=0.0))


@SETTINGS
@given(masked_batches(min_kept=2))
def test_whiten_without_shift_keeps_mean(batch):
    x, m = batch
    if loop_var(x, m) < 1e-3:
        return
    w = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(w, m).item() == pytest.approx(masked_mean(x, m).item(), abs=1e-7)
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-5)


@SETTINGS
@given(masked_batches(), st.data())
def test_sum_splits_over_halves(batch, data):
    x, m = batch
    cut = data.draw(st.integers(0, x.shape[0]))
    total = masked_sum(x[:cut], m[:cut]) + masked_sum(x[cut:], m[cut:])
    assert total.item() == pytest.approx(masked_sum(x, m).item(), abs=1e-9)
    # the mean of the whole is the count-weighted mean of the halves
    n1, n2 = int(m[:cut].sum()), int(m[cut:].sum())
    if n1 + n2:
        weighted = (n1 * masked_mean(x[:cut], m[:cut]) + n2 * masked_mean(x[cut:], m[cut:])) / (n1 + n2)
        assert weighted.item() == pytest.approx(masked_mean(x, m).item(), abs=1e-9)


def test_constant_input_whitens_to_zero_not_nan():
    x = torch.full((2, 3), 4.0)
    w = masked_whiten(x, torch.ones(2, 3))
    assert torch.equal(w, torch.zeros(2, 3))
