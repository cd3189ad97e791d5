"""Exact KL over the vocabulary (rlhfkit.core.kl.exact_token_kl / exact_sequence_kl): a naive Python loop over
positions and vocabulary, and properties (zero for one model, never negative, masked positions ignored)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core import kl as kl_module
from rlhfkit.core.kl import exact_sequence_kl, exact_token_kl


def brute_force_kl(policy_logits, ref_logits, mask, temperature):
    """sum over masked (b, t) of sum_v p log(p / q), p = softmax(policy / T), q = softmax(ref / T): plain Python."""
    B, T, V = policy_logits.shape
    totals = []
    for b in range(B):
        total = 0.0
        for t in range(T):
            if not mask[b][t]:
                continue
            a = [x / temperature for x in policy_logits[b][t].tolist()]
            c = [x / temperature for x in ref_logits[b][t].tolist()]
            za, zc = sum(math.exp(x - max(a)) for x in a), sum(math.exp(x - max(c)) for x in c)
            p = [math.exp(x - max(a)) / za for x in a]
            q = [math.exp(x - max(c)) / zc for x in c]
            total += sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


def random_case(seed, B=3, T=5, V=11, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    ref = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    mask[0, 0] = 1
    return policy, ref, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_a_brute_force_loop_over_positions_and_vocabulary(seed, temperature):
    policy, ref, mask = random_case(seed)
    expected = brute_force_kl(policy, ref, mask, temperature)
    torch.testing.assert_close(exact_sequence_kl(policy, ref, mask, temperature), expected, rtol=1e-12, atol=1e-12)
    # float32 inputs are computed in float32: the same numbers to float32's precision (sums of 5 x 11 terms)
    got32 = exact_sequence_kl(policy.float(), ref.float(), mask, temperature)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


def test_chunks_of_positions_give_the_same_sums(monkeypatch):
    policy, ref, mask = random_case(3, B=4, T=7, V=13)
    whole = exact_sequence_kl(policy, ref, mask, 0.8)
    for rows in (1, 2, 5):  # chunk boundaries inside and across sequences
        monkeypatch.setattr(kl_module, "_CHUNK_ELEMENTS", 13 * rows)
        torch.testing.assert_close(exact_sequence_kl(policy, ref, mask, 0.8), whole, rtol=1e-12, atol=1e-12)


def test_log_probs_in_give_what_logits_in_give():
    policy, ref, mask = random_case(4)
    T = 0.9
    from_logits = exact_sequence_kl(policy, ref, mask, T)
    from_logprobs = exact_sequence_kl(torch.log_softmax(policy / T, -1), torch.log_softmax(ref / T, -1), mask,
                                      logprobs=True)
    torch.testing.assert_close(from_logprobs, from_logits, rtol=1e-12, atol=1e-12)


def test_zero_for_the_same_model_and_masked_positions_never_read():
    policy, ref, mask = random_case(5)
    assert torch.equal(exact_sequence_kl(policy, policy.clone(), mask), torch.zeros(3, dtype=torch.float64))
    # Garbage (NaN, inf) at masked positions changes nothing: they are never read.
    dirty_p, dirty_q = policy.clone(), ref.clone()
    dirty_p[mask == 0] = float("nan")
    dirty_q[mask == 0] = float("inf")
    torch.testing.assert_close(exact_sequence_kl(dirty_p, dirty_q, mask), exact_sequence_kl(policy, ref, mask))
    # A fully masked row sums to exactly 0.
    mask[1] = 0
    assert exact_sequence_kl(policy, ref, mask)[1].item() == 0.0


def test_zero_probability_tokens():
    # The policy gives a token probability 0 (logit -inf): that term is 0, not NaN.
    p = torch.tensor([[0.0, 0.0, -math.inf]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    expected = sum(0.5 * math.log(0.5 / qv) for qv in torch.softmax(q[0], -1)[:2].tolist())
    assert exact_token_kl(p, q).item() == pytest.approx(expected, rel=1e-6)
    # The reference gives 0 to a token the policy can draw: the KL is infinite, as it should be.
    assert exact_token_kl(q, p).item() == math.inf


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 20.0), st.floats(0.3, 3.0))
def test_never_negative(seed, scale, temperature):
    policy, ref, mask = random_case(seed, B=2, T=4, V=9, scale=scale)
    # nearly equal distributions are where rounding could push a sum below zero
    for other in (ref, policy + 1e-7 * ref):
        for dtype in (torch.float32, torch.float64):
            per_token = exact_token_kl(policy.to(dtype), other.to(dtype), temperature)
            assert (per_token >= 0).all()
            assert (exact_sequence_kl(policy.to(dtype), other.to(dtype), mask, temperature) >= 0).all()


def test_bad_inputs_are_refused():
    policy, ref, mask = random_case(6)
    with pytest.raises(ValueError, match="shapes differ"):
        exact_token_kl(policy, ref[..., :5])
    with pytest.raises(ValueError, match="temperature"):
        exact_token_kl(policy, ref, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, T\) mask"):
        exact_sequence_kl(policy, ref, mask[:, :2])
