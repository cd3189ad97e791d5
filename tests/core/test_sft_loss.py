"""Tests for rlhfkit.core.sft_loss: hand-worked numbers, a naive loop reference, and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.logprobs import logprobs_from_logits
from rlhfkit.core.sft_loss import completion_nll_loss

SETTINGS = settings(max_examples=50, deadline=None)
GARBAGE = [float("nan"), float("-inf"), float("inf"), -1e30]


@st.composite
def sft_batches(draw):
    """float64 log-probs in [-20, 0] (B, T) and a bool loss mask (B, T)."""
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    lp = draw(st.lists(st.floats(-20, 0), min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(lp, dtype=torch.float64).reshape(b, t), torch.tensor(mask).reshape(b, t)


def loop_loss(logprobs, mask, num_tokens=None):
    total, count = 0.0, 0
    for lp, m in zip(logprobs.flatten().tolist(), mask.flatten().tolist()):
        if m:
            total -= lp
            count += 1
    normaliser = max(num_tokens if num_tokens is not None else count, 1)
    return total / normaliser, total / max(count, 1), count


# (a) Numbers worked by hand ----------------------------------------------------------------------------

LP = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
MASK = torch.tensor([[0, 1, 1], [0, 0, 1]])


def test_by_hand():
    # kept log-probs -2, -3, -6 -> NLL sum 11 over 3 tokens -> 11/3
    loss, metrics = completion_nll_loss(LP, MASK)
    assert loss.item() == pytest.approx(11 / 3)
    assert metrics["sft/nll"].item() == pytest.approx(11 / 3)
    assert metrics["sft/tokens"].item() == 3


def test_num_tokens_by_hand():
    # same sum 11, but the accumulation window holds 11 loss tokens -> 11/11 = 1; the metric stays 11/3
    loss, metrics = completion_nll_loss(LP, MASK, num_tokens=11)
    assert loss.item() == pytest.approx(1.0)
    assert metrics["sft/nll"].item() == pytest.approx(11 / 3)
    assert completion_nll_loss(LP, MASK, num_tokens=torch.tensor(22))[0].item() == pytest.approx(0.5)


def test_empty_mask_gives_zero():
    for num_tokens in (None, 0):
        loss, metrics = completion_nll_loss(LP, torch.zeros_like(MASK), num_tokens)
        assert loss.item() == 0.0 and metrics["sft/nll"].item() == 0.0 and metrics["sft/tokens"].item() == 0


def test_metrics_are_detached_scalars():
    lp = LP.clone().requires_grad_(True)
    loss, metrics = completion_nll_loss(lp, MASK)
    assert loss.requires_grad and loss.dim() == 0
    assert set(metrics) == {"sft/nll", "sft/tokens"}
    for value in metrics.values():
        assert isinstance(value, float) or (value.dim() == 0 and not value.requires_grad)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        completion_nll_loss(LP, MASK[:, :2])


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(sft_batches(), st.one_of(st.none(), st.integers(0, 50)))
def test_matches_loop(batch, num_tokens):
    lp, mask = batch
    loss, metrics = completion_nll_loss(lp, mask, num_tokens)
    ref_loss, ref_nll, ref_count = loop_loss(lp, mask, num_tokens)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-9)
    assert metrics["sft/nll"].item() == pytest.approx(ref_nll, abs=1e-9)
    assert metrics["sft/tokens"].item() == ref_count


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(sft_batches(), st.integers(0, 1000))
def test_masked_garbage_changes_nothing(batch, seed):
    lp, mask = batch
    gen = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=lp.dtype)[torch.randint(len(GARBAGE), lp.shape, generator=gen)]
    dirty = torch.where(mask, lp, junk).requires_grad_(True)
    loss, metrics = completion_nll_loss(dirty, mask)
    clean_loss, clean_metrics = completion_nll_loss(lp, mask)
    assert torch.equal(loss.detach(), clean_loss)
    assert torch.equal(metrics["sft/nll"], clean_metrics["sft/nll"])
    loss.backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[~mask] == 0).all()


@SETTINGS
@given(sft_batches(), st.data())
def test_halves_with_total_token_count_sum_to_full(batch, data):
    lp, mask = batch
    cut = data.draw(st.integers(0, lp.shape[0]))
    total = int(mask.sum())
    halves = (
        completion_nll_loss(lp[:cut], mask[:cut], total)[0]
        + completion_nll_loss(lp[cut:], mask[cut:], total)[0]
    )
    assert halves.item() == pytest.approx(completion_nll_loss(lp, mask)[0].item(), abs=1e-9)


def _tiny_lm_batch(seed, batch=6, seq=5, hidden=4, vocab=7):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64)
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    mask = torch.rand(batch, seq, generator=gen) < 0.6
    weight = torch.randn(hidden, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    return features, labels, mask, weight


def _grad(weight, features, labels, mask, num_tokens=None, scale=1.0):
    logprobs = logprobs_from_logits(features @ weight, labels)
    loss = completion_nll_loss(logprobs, mask, num_tokens)[0] * scale
    (grad,) = torch.autograd.grad(loss, weight)
    return grad


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 5))
def test_gradient_accumulation_equals_one_big_batch(seed, cut):
    # A linear "LM" (features @ W -> logits): gradients summed over two micro-batches, each normalised by
    # the window's total token count, equal the full-batch gradient exactly.
    features, labels, mask, weight = _tiny_lm_batch(seed)
    total = int(mask.sum())
    full = _grad(weight, features, labels, mask)
    accumulated = _grad(weight, features[:cut], labels[:cut], mask[:cut], total) + _grad(
        weight, features[cut:], labels[cut:], mask[cut:], total
    )
    torch.testing.assert_close(accumulated, full)


def test_per_microbatch_normalisation_is_the_old_bug():
    # Averaging per-micro-batch means (the pre-fix behaviour) differs when token counts differ:
    # micro-batch 1 has 1 token (NLL 1), micro-batch 2 has 3 tokens (NLL 3 each).
    # Correct: (1 + 9) / 4 = 2.5 ; buggy: (1/1 + 9/3) / 2 = 2.0
    lp1, m1 = torch.tensor([[-1.0, -9.0]]), torch.tensor([[1, 0]])
    lp2, m2 = torch.tensor([[-3.0, -3.0, -3.0]]), torch.tensor([[1, 1, 1]])
    fixed = completion_nll_loss(lp1, m1, 4)[0] + completion_nll_loss(lp2, m2, 4)[0]
    buggy = (completion_nll_loss(lp1, m1)[0] + completion_nll_loss(lp2, m2)[0]) / 2
    assert fixed.item() == pytest.approx(2.5)
    assert buggy.item() == pytest.approx(2.0)
