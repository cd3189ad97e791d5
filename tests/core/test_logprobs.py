"""Tests for rlhfkit.core.logprobs: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core import logprobs as logprobs_module
from rlhfkit.core.logprobs import (
    entropy_from_logits,
    logprobs_from_logits,
    shift_for_causal_lm,
)

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def logits_and_labels(draw, max_vocab=7):
    """float64 logits (B, T, V) in [-30, 30] and int64 labels (B, T)."""
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, max_vocab))
    values = draw(st.lists(st.floats(-30, 30), min_size=b * t * v, max_size=b * t * v))
    labels = draw(st.lists(st.integers(0, v - 1), min_size=b * t, max_size=b * t))
    return (
        torch.tensor(values, dtype=torch.float64).reshape(b, t, v),
        torch.tensor(labels, dtype=torch.int64).reshape(b, t),
    )


temperatures = st.sampled_from([0.25, 0.7, 1.0, 1.3, 4.0])


# Naive loop references -------------------------------------------------------------------------------


def loop_logprobs(logits, labels, temperature=1.0):
    b, t, _ = logits.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            row = [v / temperature for v in logits[i, j].tolist()]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            out[i, j] = row[labels[i, j]] - log_z
    return out


def loop_entropy(logits, temperature=1.0):
    b, t, _ = logits.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            row = [v / temperature for v in logits[i, j].tolist()]
            top = max(row)
            z = sum(math.exp(v - top) for v in row)
            probs = [math.exp(v - top) / z for v in row]
            out[i, j] = -sum(p * math.log(p) for p in probs if p > 0)
    return out


# (a) Numbers worked by hand ----------------------------------------------------------------------------


def test_logprobs_by_hand():
    # logits log([1, 2, 3]) -> softmax [1/6, 2/6, 3/6]; label 2 -> log(1/2), label 0 -> log(1/6)
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]], dtype=torch.float64))
    labels = torch.tensor([[2, 0]])
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels), torch.log(torch.tensor([[0.5, 1 / 6]], dtype=torch.float64))
    )


def test_logprobs_with_temperature_by_hand():
    # logits [0, 2 ln 3] at T=2 -> [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, 2 * math.log(3)]]], dtype=torch.float64)
    out = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    assert out.item() == pytest.approx(math.log(0.75))
    # uniform logits [0, 0] -> log(1/2) whatever the temperature
    assert logprobs_from_logits(torch.zeros(1, 1, 2), torch.tensor([[0]]), 3.0).item() == pytest.approx(
        -math.log(2)
    )


def test_entropy_by_hand():
    # uniform over 4 -> ln 4 ; [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    logits = torch.tensor([[[0.0, 2 * math.log(3)]]], dtype=torch.float64)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits, temperature=2.0).item() == pytest.approx(expected)
    # a (near) one-hot distribution has entropy 0
    assert entropy_from_logits(torch.tensor([[[0.0, -1e4]]])).item() == pytest.approx(0.0, abs=1e-6)


def test_shift_for_causal_lm_by_hand():
    # position t predicts token t + 1: logits at 0, 1 score tokens 11, 12
    input_ids = torch.tensor([[10, 11, 12]])
    logits = torch.arange(3 * 2, dtype=torch.float32).reshape(1, 3, 2)
    shifted_logits, labels = shift_for_causal_lm(logits, input_ids)
    assert labels.tolist() == [[11, 12]]
    assert torch.equal(shifted_logits, logits[:, :2])
    assert shifted_logits.data_ptr() == logits.data_ptr()  # a view, no copy


def test_negative_labels_give_zero():
    # -100 is Hugging Face's ignore index: no crash, 0 out, and no gradient
    logits = torch.randn(1, 3, 5, requires_grad=True)
    out = logprobs_from_logits(logits, torch.tensor([[1, -100, 4]]))
    assert out[0, 1].item() == 0.0
    out.sum().backward()
    assert (logits.grad[0, 1] == 0).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.int64), temperature=0.0)
    with pytest.raises(ValueError):
        entropy_from_logits(torch.zeros(1, 2, 3), temperature=-1.0)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(logits_and_labels(), temperatures)
def test_logprobs_match_loop(batch, temperature):
    logits, labels = batch
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels, temperature), loop_logprobs(logits, labels, temperature)
    )


@SETTINGS
@given(logits_and_labels(), temperatures)
def test_entropy_matches_loop(batch, temperature):
    logits, _ = batch
    torch.testing.assert_close(entropy_from_logits(logits, temperature), loop_entropy(logits, temperature))


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(logits_and_labels(), temperatures)
def test_temperature_equals_scaled_logits(batch, temperature):
    logits, labels = batch
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels, temperature), logprobs_from_logits(logits / temperature, labels)
    )
    torch.testing.assert_close(
        entropy_from_logits(logits, temperature), entropy_from_logits(logits / temperature)
    )


@SETTINGS
@given(logits_and_labels(), temperatures)
def test_probabilities_sum_to_one_over_vocab(batch, temperature):
    logits, _ = batch
    b, t, v = logits.shape
    total = sum(
        logprobs_from_logits(logits, torch.full((b, t), k, dtype=torch.int64), temperature).exp()
        for k in range(v)
    )
    torch.testing.assert_close(total, torch.ones(b, t, dtype=torch.float64))


@SETTINGS
@given(logits_and_labels(), st.floats(-1e3, 1e3))
def test_invariant_to_per_position_shift(batch, shift):
    logits, labels = batch
    torch.testing.assert_close(
        logprobs_from_logits(logits + shift, labels), logprobs_from_logits(logits, labels)
    )


@SETTINGS
@given(logits_and_labels())
def test_matches_log_softmax_and_its_gradient(batch):
    logits, labels = batch
    mine = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, labels.numel(), dtype=torch.float64).reshape(labels.shape)
    out = logprobs_from_logits(mine, labels)
    expected = F.log_softmax(ref, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad)
    # d log p(y) / d l = onehot(y) - softmax(l)
    onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    torch.testing.assert_close(mine.grad, (onehot - logits.softmax(-1)) * weights.unsqueeze(-1))


@pytest.mark.parametrize("chunk_elements", [1, 5, 11, 24, 10**6])
def test_chunking_does_not_change_results(monkeypatch, chunk_elements):
    # 1 and 5 force row chunks inside one sequence (T=4 rows of V=6), 24 is one sequence per chunk,
    # 10**6 is everything in one chunk.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(6, (3, 5), generator=gen)
    shifted, labels = shift_for_causal_lm(logits, input_ids)  # non-contiguous view
    expected_lp = loop_logprobs(shifted, labels, 0.8)
    expected_ent = loop_entropy(shifted, 0.8)
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", chunk_elements)
    torch.testing.assert_close(logprobs_from_logits(shifted, labels, 0.8), expected_lp)
    torch.testing.assert_close(entropy_from_logits(shifted, 0.8), expected_ent)


def test_half_precision_is_upcast():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 50, generator=gen) * 5).to(torch.bfloat16)
    labels = torch.randint(50, (2, 3), generator=gen)
    out = logprobs_from_logits(logits, labels)
    ent = entropy_from_logits(logits)
    assert out.dtype == torch.float32 and ent.dtype == torch.float32
    # identical to the float32 computation on the same (bf16-rounded) numbers
    torch.testing.assert_close(out, logprobs_from_logits(logits.float(), labels))
    torch.testing.assert_close(ent, entropy_from_logits(logits.float()))
    # and gradients flow back in the input dtype
    leaf = logits.clone().requires_grad_(True)
    logprobs_from_logits(leaf, labels).sum().backward()
    assert leaf.grad.dtype == torch.bfloat16


def test_other_leading_shapes():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(5, (2, 2, 3), generator=gen)
    flat = loop_logprobs(logits.reshape(4, 3, 5), labels.reshape(4, 3)).reshape(2, 2, 3)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), flat)
    torch.testing.assert_close(logprobs_from_logits(logits[0, 0], labels[0, 0]), flat[0, 0])
    assert entropy_from_logits(logits).shape == (2, 2, 3)
    assert logprobs_from_logits(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.int64)).shape == (0, 3)


def test_extreme_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e30, 1e30, 0.0]]])
    labels = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, labels)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(-2e4)
    assert torch.isfinite(entropy_from_logits(logits)).all()


def test_entropy_with_masked_vocabulary():
    # -inf logits (top-k / vocabulary masking) have p = 0 and add nothing: [0, 0, -inf] is uniform over 2
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    ent = entropy_from_logits(logits)
    assert ent.item() == pytest.approx(math.log(2))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(-math.log(2))


@SETTINGS
@given(logits_and_labels(max_vocab=6), temperatures)
def test_entropy_is_expected_negative_logprob(batch, temperature):
    # H = -sum_v p_v log p_v, computed with logprobs_from_logits over every label
    logits, _ = batch
    b, t, v = logits.shape
    h = torch.zeros(b, t, dtype=torch.float64)
    for k in range(v):
        lp = logprobs_from_logits(logits, torch.full((b, t), k, dtype=torch.int64), temperature)
        h -= lp.exp() * lp
    torch.testing.assert_close(entropy_from_logits(logits, temperature), h)
    assert (entropy_from_logits(logits, temperature) <= math.log(v) + 1e-9).all()
