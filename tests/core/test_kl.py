"""Tests for rlhfkit.core.kl: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.kl import KL_ESTIMATORS, kl_penalty

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def logprob_pairs(draw, low=-30.0):
    """float64 (B, T) policy and reference log-probs in [low, 0]."""
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lp = draw(st.lists(st.floats(low, 0), min_size=b * t, max_size=b * t))
    ref = draw(st.lists(st.floats(low, 0), min_size=b * t, max_size=b * t))
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64).reshape(b, t)
    return as_tensor(lp), as_tensor(ref)


def loop_kl(logprobs, ref_logprobs, estimator, max_log_ratio=20.0):
    out = []
    for p, q in zip(logprobs.flatten().tolist(), ref_logprobs.flatten().tolist()):
        d = p - q  # log p - log q
        if estimator == "k1":
            out.append(d)
        elif estimator == "k2":
            out.append(0.5 * d * d)
        elif estimator == "abs":
            out.append(abs(d))
        else:
            if max_log_ratio is not None:
                d = min(max(d, -max_log_ratio), max_log_ratio)
            log_r = -d
            out.append(math.exp(log_r) - 1 - log_r)
    return torch.tensor(out, dtype=torch.float64).reshape(logprobs.shape)


# (a) Numbers worked by hand ----------------------------------------------------------------------------

LP = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)  # log ratio logp - logq = [1, -1]


def test_by_hand():
    # k1 = [1, -1]; k2 = 0.5 * [1, 1]; abs = [1, 1]
    torch.testing.assert_close(kl_penalty(LP, REF, "k1"), torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(kl_penalty(LP, REF, "k2"), torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(kl_penalty(LP, REF, "abs"), torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    # k3 with log r = logq - logp = [-1, 1]: (e^-1 - 1) + 1 = e^-1 = 0.3679 ; (e - 1) - 1 = e - 2 = 0.7183
    expected_k3 = torch.tensor([[math.exp(-1), math.e - 2]], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(LP, REF, "k3"), expected_k3)


def test_default_is_k1():
    assert torch.equal(kl_penalty(LP, REF), LP - REF)


def test_k3_clamp_prevents_overflow():
    # logq - logp = 100: exp(100) overflows float32 to inf. Clamped to 20: e^20 - 1 - 20.
    lp, ref = torch.tensor([-100.0]), torch.tensor([0.0])
    assert torch.isinf(kl_penalty(lp, ref, "k3", max_log_ratio=None)).all()
    clamped = kl_penalty(lp, ref, "k3")
    assert clamped.item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    # Beyond the bound the estimate is flat, so its gradient is 0 (and finite).
    lp.requires_grad_(True)
    kl_penalty(lp, ref, "k3").sum().backward()
    assert lp.grad.item() == 0.0


def test_clamp_only_touches_k3():
    lp, ref = torch.tensor([-50.0, 40.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for name in ("k1", "k2", "abs"):
        assert torch.equal(kl_penalty(lp, ref, name, max_log_ratio=1.0), kl_penalty(lp, ref, name, None))


def test_errors():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(LP, REF, "k4")
    with pytest.raises(ValueError):
        kl_penalty(LP, REF[:, :1])
    with pytest.raises(ValueError):
        kl_penalty(LP, REF, "k3", max_log_ratio=0.0)


def test_registry_names():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs"}


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(logprob_pairs(), st.sampled_from(sorted(KL_ESTIMATORS)), st.sampled_from([None, 5.0, 20.0]))
def test_matches_loop(pair, estimator, max_log_ratio):
    lp, ref = pair
    torch.testing.assert_close(
        kl_penalty(lp, ref, estimator, max_log_ratio), loop_kl(lp, ref, estimator, max_log_ratio)
    )


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(logprob_pairs(low=-60.0), st.sampled_from([None, 20.0]))
def test_k3_k2_abs_are_non_negative(pair, max_log_ratio):
    lp, ref = pair
    for name in ("k2", "k3", "abs"):
        assert (kl_penalty(lp, ref, name, max_log_ratio) >= 0).all()


@SETTINGS
@given(logprob_pairs())
def test_zero_when_policies_agree(pair):
    lp, _ = pair
    for name in KL_ESTIMATORS:
        assert (kl_penalty(lp, lp.clone(), name) == 0).all()


@SETTINGS
@given(logprob_pairs())
def test_k1_is_antisymmetric_and_k2_abs_symmetric(pair):
    lp, ref = pair
    assert torch.equal(kl_penalty(lp, ref, "k1"), -kl_penalty(ref, lp, "k1"))
    assert torch.equal(kl_penalty(lp, ref, "k2"), kl_penalty(ref, lp, "k2"))
    assert torch.equal(kl_penalty(lp, ref, "abs"), kl_penalty(ref, lp, "abs"))


@SETTINGS
@given(st.floats(-1, 1))
def test_k3_agrees_with_k2_to_second_order(d):
    # With x = log r: k3 = e^x - 1 - x = x^2/2 + x^3/6 + ..., so |k3 - k2| <= |x|^3/6 * e^|x|.
    lp, ref = torch.tensor([d], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    gap = (kl_penalty(lp, ref, "k3") - kl_penalty(lp, ref, "k2")).abs().item()
    assert gap <= abs(d) ** 3 / 6 * math.exp(abs(d)) + 1e-15


@pytest.mark.parametrize("seed", [0, 1])
def test_k1_and_k3_are_unbiased_monte_carlo(seed):
    # Two random categoricals over 8 outcomes; sample x ~ p, average the per-sample estimates and compare
    # with the exact KL(p || q) = sum p log(p / q). Tolerance: 5 standard errors of the sample mean.
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(8, generator=gen, dtype=torch.float64), dim=0)
    logq = torch.log_softmax(torch.randn(8, generator=gen, dtype=torch.float64), dim=0)
    exact = (logp.exp() * (logp - logq)).sum().item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    for name in ("k1", "k3"):
        estimates = kl_penalty(logp[samples], logq[samples], name)
        stderr = estimates.std().item() / math.sqrt(len(samples))
        assert abs(estimates.mean().item() - exact) < 5 * stderr + 1e-12, name
    # k2 is biased: it is not claimed to match, only to be non-negative (tested above).
