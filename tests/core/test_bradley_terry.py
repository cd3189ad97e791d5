"""Tests for rlhfkit.core.bradley_terry: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.bradley_terry import bradley_terry_loss, pairwise_accuracy

SETTINGS = settings(max_examples=50, deadline=None)
scores = st.floats(-20, 20)


@st.composite
def pairs(draw, min_size=1, max_size=8, with_margin=False, with_weights=False):
    """float64 (chosen, rejected, margin or None, weights or None), each (B,)."""
    n = draw(st.integers(min_size, max_size))

    def vec(elements):
        return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=torch.float64)

    # integers make exact ties likely enough to exercise the 0.5 rule
    score = st.one_of(scores, st.integers(-3, 3).map(float))
    chosen, rejected = vec(score), vec(score)
    margin = vec(st.floats(0, 5)) if with_margin else None
    weights = vec(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])) if with_weights else None
    return chosen, rejected, margin, weights


def loop_reference(chosen, rejected, margin=None, weights=None):
    """(loss, accuracy, margin, chosen mean, rejected mean) by plain loops, softplus(-d) = log(1 + e^-d)."""
    n = len(chosen)
    margin = [0.0] * n if margin is None else margin.tolist()
    weights = [1.0] * n if weights is None else weights.tolist()
    wsum = sum(weights) or 1.0
    loss = acc = gap = c = r = 0.0
    for s_pos, s_neg, m, w in zip(chosen.tolist(), rejected.tolist(), margin, weights):
        d = s_pos - s_neg - m
        # stable -log sigmoid(d) = log(1 + exp(-d))
        loss += w * (max(-d, 0.0) + math.log1p(math.exp(-abs(d))))
        acc += w * (1.0 if s_pos > s_neg else 0.5 if s_pos == s_neg else 0.0)
        gap += w * (s_pos - s_neg)
        c += w * s_pos
        r += w * s_neg
    return tuple(v / wsum for v in (loss, acc, gap, c, r))


# (a) Numbers worked by hand ----------------------------------------------------------------------------


def test_by_hand():
    # d = [1, 0]: loss = (log(1 + e^-1) + log 2) / 2 = (0.313262 + 0.693147) / 2 = 0.503204
    # accuracy (1 + 0.5 tie) / 2 = 0.75 ; margin (1 + 0) / 2 = 0.5 ; chosen 0.5 ; rejected 0
    loss, metrics = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2)
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    assert metrics["reward/accuracy"].item() == pytest.approx(0.75)
    assert metrics["reward/margin"].item() == pytest.approx(0.5)
    assert metrics["reward/chosen"].item() == pytest.approx(0.5)
    assert metrics["reward/rejected"].item() == pytest.approx(0.0)


def test_margin_by_hand():
    # d - m = [1 - 1, 0 - 0] = [0, 0] -> loss = log 2 ; reward/margin still reports s+ - s- = 0.5
    loss, metrics = bradley_terry_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, 0.0])
    )
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["reward/margin"].item() == pytest.approx(0.5)


def test_weights_by_hand():
    # weights [1, 0] keep only pair 0: loss log(1 + e^-1) = 0.313262, accuracy 1
    # weights [3, 1]: loss (3 * 0.313262 + 0.693147) / 4 = 0.408233
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    loss, metrics = bradley_terry_loss(chosen, rejected, weights=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert metrics["reward/accuracy"].item() == 1.0
    loss, _ = bradley_terry_loss(chosen, rejected, weights=torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx((3 * math.log1p(math.exp(-1)) + math.log(2)) / 4)
    # all-zero weights: nothing to learn from, loss 0 rather than 0/0
    loss, _ = bradley_terry_loss(chosen, rejected, weights=torch.zeros(2))
    assert loss.item() == 0.0


def test_pairwise_accuracy_by_hand():
    # correct, tie, wrong, correct -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert (
        pairwise_accuracy(torch.tensor([2.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, -5.0])).item()
        == 0.625
    )


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(
    st.one_of(
        pairs(), pairs(with_margin=True), pairs(with_weights=True), pairs(with_margin=True, with_weights=True)
    )
)
def test_matches_loop(batch):
    chosen, rejected, margin, weights = batch
    loss, metrics = bradley_terry_loss(chosen, rejected, margin, weights)
    ref = loop_reference(chosen, rejected, margin, weights)
    got = (
        loss,
        *(metrics[k] for k in ("reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected")),
    )
    for value, expected in zip(got, ref):
        assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert pairwise_accuracy(chosen, rejected, weights).item() == pytest.approx(ref[1])


# (c) Properties -----------------------------------------------------------------------------------------


def test_finite_for_huge_score_gaps():
    # d = +1000 -> loss ~ e^-1000 = 0 ; d = -1000 -> loss = 1000 exactly (log(sigmoid) would be -inf)
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    rejected = torch.zeros(2)
    loss, _ = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(500.0)
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -0.5]))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        c, r = torch.tensor([1000.0, -1000.0], dtype=dtype), torch.tensor([-1000.0, 1000.0], dtype=dtype)
        assert torch.isfinite(bradley_terry_loss(c, r, margin=torch.tensor([5.0, 5.0], dtype=dtype))[0])


@SETTINGS
@given(pairs(with_margin=True))
def test_gradient_is_minus_one_minus_sigmoid(batch):
    chosen, rejected, margin, _ = batch
    chosen, rejected = chosen.requires_grad_(True), rejected.requires_grad_(True)
    loss, _ = bradley_terry_loss(chosen, rejected, margin)
    loss.backward()
    # d/ds+ of mean_i -log sigmoid(d_i) = -(1 - sigmoid(d_i)) / B ; d/ds- is its negation
    d = (chosen - rejected - margin).detach()
    expected = -(1 - torch.sigmoid(d)) / len(d)
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


@SETTINGS
@given(pairs(min_size=1, max_size=4), pairs(min_size=1, max_size=4))
def test_equal_halves_average_to_full(first, second):
    # make the halves the same size, then mean over the full batch = average of the halves' means
    n = min(len(first[0]), len(second[0]))
    c1, r1, c2, r2 = first[0][:n], first[1][:n], second[0][:n], second[1][:n]
    full, full_metrics = bradley_terry_loss(torch.cat([c1, c2]), torch.cat([r1, r2]))
    (l1, m1), (l2, m2) = bradley_terry_loss(c1, r1), bradley_terry_loss(c2, r2)
    assert ((l1 + l2) / 2).item() == pytest.approx(full.item(), rel=1e-12)
    for key, value in full_metrics.items():
        assert ((m1[key] + m2[key]) / 2).item() == pytest.approx(value.item(), abs=1e-12)


@SETTINGS
@given(pairs(min_size=2, max_size=8, with_margin=True), st.data())
def test_gradient_accumulation_equals_one_big_batch(batch, data):
    # A parameter vector shifts every score; micro-batch losses scaled by n_i / N and summed give the
    # full-batch gradient, whatever the (unequal) micro-batch sizes.
    chosen, rejected, margin, _ = batch
    n = len(chosen)
    cut = data.draw(st.integers(1, n - 1))
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def grad(sl, scale=1.0):
        c = chosen[sl] * theta[0] + theta[1]
        r = rejected[sl] * theta[0] - theta[1]
        (g,) = torch.autograd.grad(bradley_terry_loss(c, r, margin[sl])[0] * scale, theta)
        return g

    full = grad(slice(None))
    accumulated = grad(slice(None, cut), cut / n) + grad(slice(cut, None), (n - cut) / n)
    torch.testing.assert_close(accumulated, full)


@SETTINGS
@given(pairs(with_margin=True, with_weights=True), st.integers(1, 3))
def test_zero_weight_pairs_change_nothing(batch, extra):
    chosen, rejected, margin, weights = batch
    weights = weights + 1.0  # every real pair counts
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)[
        torch.arange(extra) % 3
    ]
    dirty_chosen = torch.cat([chosen, junk]).requires_grad_(True)
    dirty = bradley_terry_loss(
        dirty_chosen,
        torch.cat([rejected, junk.flip(0)]),
        torch.cat([margin, junk]),
        torch.cat([weights, torch.zeros(extra, dtype=torch.float64)]),
    )
    clean = bradley_terry_loss(chosen, rejected, margin, weights)
    assert dirty[0].item() == pytest.approx(clean[0].item(), rel=1e-12)
    for key in clean[1]:
        assert dirty[1][key].item() == pytest.approx(clean[1][key].item(), rel=1e-12, abs=1e-12)
    dirty[0].backward()
    assert torch.isfinite(dirty_chosen.grad).all() and (dirty_chosen.grad[len(chosen) :] == 0).all()


@SETTINGS
@given(pairs(max_size=4), st.lists(st.integers(1, 3), min_size=4, max_size=4))
def test_integer_weight_equals_repeating_the_pair(batch, counts):
    chosen, rejected, _, _ = batch
    counts = torch.tensor(counts[: len(chosen)])
    weighted, weighted_metrics = bradley_terry_loss(chosen, rejected, weights=counts.to(torch.float64))
    repeated, repeated_metrics = bradley_terry_loss(
        chosen.repeat_interleave(counts), rejected.repeat_interleave(counts)
    )
    assert weighted.item() == pytest.approx(repeated.item(), rel=1e-12)
    for key in weighted_metrics:
        assert weighted_metrics[key].item() == pytest.approx(repeated_metrics[key].item(), abs=1e-12)


@SETTINGS
@given(pairs(), st.floats(-100, 100))
def test_invariant_to_common_score_shift(batch, shift):
    # only differences of rewards are identified by Bradley-Terry
    chosen, rejected, _, _ = batch
    shifted = bradley_terry_loss(chosen + shift, rejected + shift)[0]
    assert shifted.item() == pytest.approx(bradley_terry_loss(chosen, rejected)[0].item(), rel=1e-9, abs=1e-9)


@SETTINGS
@given(pairs())
def test_accuracy_is_antisymmetric(batch):
    chosen, rejected, _, _ = batch
    assert (
        pairwise_accuracy(chosen, rejected) + pairwise_accuracy(rejected, chosen)
    ).item() == pytest.approx(1.0)


def test_metrics_are_detached_scalars():
    chosen = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, torch.tensor([0.0, 3.0]))
    assert loss.requires_grad and loss.dim() == 0
    assert set(metrics) == {"reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected"}
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad
