"""Tests for rlhfkit.core.head_logprobs: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch

from rlhfkit.core import head_logprobs as module
from rlhfkit.core.head_logprobs import head_logprobs


@pytest.fixture
def small_chunks(monkeypatch):
    """Three rows of a 7-token vocabulary per chunk: every test input spans several chunks."""
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 21)


def _inputs(n=10, hidden=4, vocab=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, labels


# Hand-worked ------------------------------------------------------------------------------------------


def test_hand_worked_logprob_and_entropy():
    # h = 1, W = [1, 2, 0]: logits (1, 2, 0); logsumexp = log(e + e^2 + 1) = log(11.107338) = 2.407606.
    h = torch.tensor([[1.0]])
    w = torch.tensor([[1.0], [2.0], [0.0]])
    logprob, entropy = head_logprobs(h, w, torch.tensor([1]), with_entropy=True)
    assert logprob.item() == pytest.approx(2.0 - 2.407606, abs=1e-5)
    # p = (0.244728, 0.665241, 0.090031); H = 2.407606 - (0.244728 * 1 + 0.665241 * 2) = 0.832396
    assert entropy.item() == pytest.approx(0.832396, abs=1e-5)
    # Temperature 2: logits (0.5, 1, 0); logsumexp = log(5.367003) = log 5 + log 1.073401 = 1.609438 + 0.070832.
    logprob, _ = head_logprobs(h, w, torch.tensor([1]), temperature=2.0)
    assert logprob.item() == pytest.approx(1.0 - 1.680270, abs=1e-5)
    # A bias shifts the logits: (1, 2, 0) + (0, 0, 2) = (1, 2, 2); log p(2) = 2 - log(e + 2 e^2).
    logprob, _ = head_logprobs(h, w, torch.tensor([2]), bias=torch.tensor([0.0, 0.0, 2.0]))
    assert logprob.item() == pytest.approx(2.0 - math.log(math.e + 2 * math.e**2), abs=1e-5)


def test_hand_worked_gradient():
    # d log p(y) / d logits = onehot(y) - p; with h = 1 and W = (1, 2, 0)^T: dh = sum_j (onehot - p)_j W_j.
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[1.0], [2.0], [0.0]], requires_grad=True)
    logprob, _ = head_logprobs(h, w, torch.tensor([1]))
    logprob.sum().backward()
    p = [0.244728, 0.665241, 0.090031]
    assert h.grad.item() == pytest.approx((0 - p[0]) * 1 + (1 - p[1]) * 2 + (0 - p[2]) * 0, abs=1e-5)
    assert w.grad.flatten().tolist() == pytest.approx([-p[0], 1 - p[1], -p[2]], abs=1e-5)


# Naive loop reference ---------------------------------------------------------------------------------


def _loop_reference(h, w, b, labels, temperature):
    """One row at a time: logits, log_softmax, pick the label; entropy as -sum p log p."""
    logprobs, entropies = [], []
    for i in range(h.shape[0]):
        logits = (w @ h[i] + b) / temperature
        log_p = torch.log_softmax(logits, dim=0)
        logprobs.append(log_p[labels[i]] if labels[i] >= 0 else log_p.sum() * 0)
        entropies.append(-(log_p.exp() * log_p).sum())
    return torch.stack(logprobs), torch.stack(entropies)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_values_and_gradients_match_a_loop_over_rows(small_chunks, temperature):
    h, w, b, labels = _inputs()
    labels[3] = -100
    weights = torch.linspace(-1, 2, h.shape[0], dtype=h.dtype)  # a loss that weighs rows differently

    def loss(fn):
        logprobs, entropy = fn()
        return (weights * logprobs).sum() + 0.3 * (weights.flip(0) * entropy).sum(), logprobs, entropy

    ours, logprobs, entropy = loss(lambda: head_logprobs(h, w, labels, temperature, b, with_entropy=True))
    grads = torch.autograd.grad(ours, (h, w, b))
    ref, ref_logprobs, ref_entropy = loss(lambda: _loop_reference(h, w, b, labels, temperature))
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# Properties -------------------------------------------------------------------------------------------


def test_gradcheck_for_every_combination_of_used_outputs(small_chunks):
    h, w, b, labels = _inputs(n=7)
    labels[0] = -1
    for pick in (lambda lp, ent: lp, lambda lp, ent: ent, lambda lp, ent: (lp, ent)):
        assert torch.autograd.gradcheck(lambda h, w, b: pick(*head_logprobs(h, w, labels, 0.8, b, True)), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: head_logprobs(h, w, labels)[0], (h, w))


def test_chunking_does_not_change_results(monkeypatch):
    h, w, b, labels = _inputs(n=23)
    full = head_logprobs(h, w, labels, 1.3, b, with_entropy=True)
    full_grads = torch.autograd.grad(sum(x.sum() for x in full), (h, w, b))
    for elements in (7, 14, 70, 10**6):  # 1, 2, 10 and all rows per chunk
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", elements)
        out = head_logprobs(h, w, labels, 1.3, b, with_entropy=True)
        grads = torch.autograd.grad(sum(x.sum() for x in out), (h, w, b))
        for got, want in zip((*out, *grads), (*full, *full_grads)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_masked_labels_give_zero_and_no_gradient_to_their_rows(small_chunks):
    h, w, b, labels = _inputs()
    labels[[2, 5]] = -100
    logprobs, _ = head_logprobs(h, w, labels, bias=b)
    assert logprobs[2] == 0 and logprobs[5] == 0
    logprobs.sum().backward()
    assert h.grad[2].abs().sum() == 0 and h.grad[5].abs().sum() == 0
    # and their rows' values change nothing else: the same loss without those rows
    h2 = h.detach()[[i for i in range(10) if i not in (2, 5)]].clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    head_logprobs(h2, w2, labels[labels >= 0], bias=b.detach())[0].sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-12)


def test_two_half_batches_sum_to_the_full_batch_gradient(small_chunks):
    h, w, b, labels = _inputs(n=12)
    head_logprobs(h, w, labels, 0.9, b)[0].sum().backward()
    full = w.grad.clone()
    w.grad = None
    for rows in (slice(0, 6), slice(6, 12)):
        head_logprobs(h[rows], w, labels[rows], 0.9, b)[0].sum().backward()
    torch.testing.assert_close(w.grad, full, rtol=0, atol=1e-12)


def test_bf16_hidden_states_are_scored_in_float32_also_under_autocast():
    h, w, _, labels = _inputs(n=6, dtype=torch.float32)
    h16 = h.detach().bfloat16().requires_grad_()
    expected = head_logprobs(h16.detach().float(), w, labels)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = head_logprobs(h16, w, labels)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-6)
    logprobs.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_masked_vocabulary_entries_keep_entropy_and_gradients_finite(small_chunks):
    h, w, b, labels = _inputs()
    labels[:] = 0
    bias = b.detach().clone()
    bias[[3, 4]] = float("-inf")  # tokens that can never be drawn
    logprobs, entropy = head_logprobs(h, w, labels, 1.0, bias.requires_grad_(), with_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    finite = bias.detach().clone()
    finite[[3, 4]] = -1e4  # numerically the same distribution
    _, entropy_finite = head_logprobs(h, w, labels, 1.0, finite, with_entropy=True)
    torch.testing.assert_close(entropy, entropy_finite, rtol=0, atol=1e-10)


def test_shapes_are_kept_and_bad_arguments_are_refused():
    h, w, b, labels = _inputs(n=6)
    logprobs, entropy = head_logprobs(h.reshape(2, 3, 4), w, labels.reshape(2, 3), with_entropy=True)
    assert logprobs.shape == (2, 3) and entropy.shape == (2, 3)
    assert head_logprobs(h, w, labels)[1] is None
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head_logprobs(h, w, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels shape"):
        head_logprobs(h, w, labels[:5])
    with pytest.raises(ValueError, match="weight must be"):
        head_logprobs(h, w.t(), labels)


def test_no_rows_give_zero_gradients_of_the_weight_and_bias():
    h, w, b, labels = _inputs(n=0)
    logprobs, entropy = head_logprobs(h, w, labels, bias=b, with_entropy=True)
    assert logprobs.shape == (0,) and entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert h.grad.shape == (0, 4)
