"""Tests for rlhfkit.core.grpo_loss: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.grpo_loss import grpo_policy_loss
from rlhfkit.core.ppo_loss import LOSS_AGGREGATIONS, aggregate_loss, ppo_policy_loss

SETTINGS = settings(max_examples=30, deadline=None)
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30]
NAN = float("nan")
AGGREGATIONS = sorted(LOSS_AGGREGATIONS)
NORM = "seq-mean-token-sum-norm"


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


@st.composite
def batches(draw, rows=None):
    """float64 logprobs, old_logprobs, ref_logprobs (B, T) in [-2, 0], advantages (B,) in [-2, 2] and a
    bool mask (B, T)."""
    b, t = draw(st.integers(1, 5) if rows is None else rows), draw(st.integers(1, 6))

    def matrix():
        return f64(draw(st.lists(st.floats(-2, 0), min_size=b * t, max_size=b * t))).reshape(b, t)

    logprobs, old, ref = matrix(), matrix(), matrix()
    advantages = f64(draw(st.lists(st.floats(-2, 2), min_size=b, max_size=b)))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    return logprobs, old, ref, advantages, mask


options = st.fixed_dictionaries(
    {
        "clip_eps": st.floats(0.05, 0.5),
        "clip_eps_high": st.one_of(st.none(), st.floats(0.0, 0.5)),
        "beta": st.sampled_from([0.0, 0.04, 0.5]),
        "aggregation": st.sampled_from(AGGREGATIONS),
        "max_tokens": st.integers(1, 8),
    }
)


def with_garbage(x, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(len(GARBAGE), x.shape, generator=gen)]
    return torch.where(mask, x, junk)


# Naive loop reference ------------------------------------------------------------------------------------


def loop_grpo(
    logprobs, old, ref, advantages, mask, clip_eps, clip_eps_high, beta, aggregation, max_tokens
):
    high = clip_eps if clip_eps_high is None else clip_eps_high
    rows, kls = [], []
    for i in range(logprobs.shape[0]):
        a = advantages[i].item()
        row = []
        for t in range(logprobs.shape[1]):
            if not mask[i, t]:
                continue
            lp = logprobs[i, t].item()
            ratio = math.exp(lp - old[i, t].item())
            surrogate = max(-a * ratio, -a * min(max(ratio, 1 - clip_eps), 1 + high))
            d = ref[i, t].item() - lp
            k3 = math.exp(d) - d - 1
            kls.append(k3)
            row.append(surrogate + beta * k3)
        rows.append(row)
    if aggregation == "token-mean":
        tokens = [v for row in rows for v in row]
        loss = sum(tokens) / max(len(tokens), 1)
    elif aggregation == NORM:
        loss = sum(sum(row) / max_tokens for row in rows) / len(rows)
    else:
        per_row = [
            sum(row) / (len(row) if aggregation == "seq-mean-token-mean" else 1) for row in rows if row
        ]
        loss = sum(per_row) / max(len(per_row), 1)
    return loss, sum(kls) / max(len(kls), 1)


# (a) Numbers worked by hand ----------------------------------------------------------------------------

# One response of two tokens, advantage +1, old log-probs 0 (ratios 1.5 and 0.9), eps 0.2, beta 0.1,
# reference log-probs [ln 1.5, 0]:
#   token 1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped) ; ref - logp = 0 -> k3 = 0
#   token 2: ratio 0.9 -> max(-0.9, -0.9) = -0.9 (inside the clip range) ;
#            ref - logp = ln(1/0.9) -> k3 = 1/0.9 - ln(1/0.9) - 1
# token-mean: (-1.2 - 0.9) / 2 + 0.1 * k3 / 2
# gradient: token 1: 0 (clipped surrogate, and 1 - exp(0) = 0 for k3)
#           token 2: d(-ratio)/dlogp / 2 = -0.9 / 2 = -0.45, plus 0.1 * (1 - 1/0.9) / 2 (about -0.0056)
LP = f64([[math.log(1.5), math.log(0.9)]])
OLD = f64([[0.0, 0.0]])
REF = f64([[math.log(1.5), 0.0]])
ADV = f64([1.0])
MASK = torch.ones(1, 2, dtype=torch.bool)
K3 = 1 / 0.9 - math.log(1 / 0.9) - 1  # about 0.0057506


def test_grpo_loss_by_hand():
    lp = LP.clone().requires_grad_(True)
    loss, metrics = grpo_policy_loss(lp, OLD, REF, ADV, MASK, clip_eps=0.2, beta=0.1)
    assert K3 == pytest.approx(0.0057506, abs=1e-7)
    assert loss.item() == pytest.approx(-1.05 + 0.1 * K3 / 2)
    assert metrics["ppo/policy_loss"].item() == pytest.approx(-1.05)
    assert metrics["grpo/loss"].item() == pytest.approx(-1.05 + 0.1 * K3 / 2)
    assert metrics["grpo/kl"].item() == pytest.approx(K3 / 2)
    assert metrics["ppo/clipfrac"].item() == pytest.approx(0.5)
    assert metrics["ppo/ratio_mean"].item() == pytest.approx(1.2)
    loss.backward()
    torch.testing.assert_close(lp.grad, f64([[0.0, -0.45 + 0.1 * (1 - 1 / 0.9) / 2]]))


def test_grpo_loss_aggregations_by_hand():
    # With a second, empty row (advantage NaN: it has no tokens) and max_tokens 4:
    # seq-mean-token-sum-norm: (-2.1 + 0.1 * K3) / 4 / 2 rows ; seq-mean-token-mean ignores the empty row
    lp, old, ref = (torch.cat([x, f64([[NAN, NAN]])]) for x in (LP, OLD, REF))
    adv, mask = f64([1.0, NAN]), torch.tensor([[True, True], [False, False]])
    norm, _ = grpo_policy_loss(lp, old, ref, adv, mask, beta=0.1, aggregation=NORM, max_tokens=4)
    assert norm.item() == pytest.approx((-2.1 + 0.1 * K3) / 8)
    mean, _ = grpo_policy_loss(lp, old, ref, adv, mask, beta=0.1, aggregation="seq-mean-token-mean")
    assert mean.item() == pytest.approx(-1.05 + 0.1 * K3 / 2)
    # clip-higher 0.6 leaves ratio 1.5 unclipped: (-1.5 - 0.9) / 2
    high, metrics = grpo_policy_loss(LP, OLD, None, ADV, MASK, beta=0.0, clip_eps_high=0.6)
    assert high.item() == pytest.approx(-1.2) and metrics["ppo/clipfrac"].item() == 0.0


def test_metrics_are_detached_scalars():
    lp = LP.clone().requires_grad_(True)
    loss, metrics = grpo_policy_loss(lp, OLD, REF, ADV, MASK)
    assert loss.requires_grad and loss.dim() == 0
    assert set(metrics) == {
        "ppo/clipfrac",
        "ppo/dual_clipfrac",
        "ppo/approx_kl",
        "ppo/ratio_mean",
        "ppo/policy_loss",
        "grpo/kl",
        "grpo/loss",
    }
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_beta_zero_skips_the_reference():
    lp = LP.clone().requires_grad_(True)
    without, metrics = grpo_policy_loss(lp, OLD, None, ADV, MASK, beta=0.0)
    assert "grpo/kl" not in metrics and without.item() == pytest.approx(-1.05)
    # with a reference but beta 0 the loss is the same; the KL is still reported
    with_ref, metrics = grpo_policy_loss(lp, OLD, REF, ADV, MASK, beta=0.0)
    assert torch.equal(with_ref, without) and metrics["grpo/kl"].item() == pytest.approx(K3 / 2)


def test_errors():
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(LP, OLD, None, ADV, MASK, beta=0.04)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(LP, OLD, REF[:, :1], ADV, MASK)
    with pytest.raises(ValueError, match="beta"):
        grpo_policy_loss(LP, OLD, REF, ADV, MASK, beta=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_policy_loss(LP, OLD, REF, f64([[1.0, 1.0]]), MASK)
    with pytest.raises(ValueError, match="advantages"):
        grpo_policy_loss(LP, OLD, REF, f64([1.0, 2.0]), MASK)
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_policy_loss(LP, OLD, REF, ADV, MASK, aggregation=NORM)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_policy_loss(LP, OLD, REF, ADV, MASK, aggregation="sum")
    with pytest.raises(ValueError):
        grpo_policy_loss(LP, OLD[:, :1], REF, ADV, MASK)
    with pytest.raises(ValueError):
        grpo_policy_loss(LP[0], OLD, REF, ADV, MASK)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(batches(), options)
def test_matches_loop(batch, opts):
    loss, metrics = grpo_policy_loss(*batch, **opts)
    ref_loss, ref_kl = loop_grpo(*batch, **opts)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-9)
    assert metrics["grpo/kl"].item() == pytest.approx(ref_kl, abs=1e-9)


@SETTINGS
@given(batches(), options)
def test_surrogate_is_ppo_with_broadcast_advantages(batch, opts):
    lp, old, ref, adv, mask = batch
    loss, metrics = grpo_policy_loss(lp, old, ref, adv, mask, **{**opts, "beta": 0.0})
    ppo_loss, _ = ppo_policy_loss(
        lp,
        old,
        adv[:, None].expand_as(lp),
        mask,
        clip_eps=opts["clip_eps"],
        clip_eps_high=opts["clip_eps_high"],
        aggregation=opts["aggregation"],
        max_tokens=opts["max_tokens"],
    )
    assert torch.equal(loss, ppo_loss) and torch.equal(metrics["ppo/policy_loss"], ppo_loss)


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(batches(), options, st.integers(0, 1000))
def test_masked_garbage_changes_nothing(batch, opts, seed):
    lp, old, ref, adv, mask = batch
    dirty = with_garbage(lp, mask, seed).requires_grad_(True)
    # a row without real tokens may even have a NaN advantage
    dirty_adv = torch.where(mask.any(dim=1), adv, torch.full_like(adv, NAN))
    loss, metrics = grpo_policy_loss(
        dirty, with_garbage(old, mask, seed + 1), with_garbage(ref, mask, seed + 2), dirty_adv, mask, **opts
    )
    clean = lp.clone().requires_grad_(True)
    clean_loss, clean_metrics = grpo_policy_loss(clean, old, ref, adv, mask, **opts)
    assert torch.equal(loss.detach(), clean_loss.detach())
    for name in clean_metrics:
        assert torch.equal(metrics[name], clean_metrics[name]), name
    loss.backward()
    clean_loss.backward()
    assert torch.equal(dirty.grad, clean.grad) and (dirty.grad[~mask] == 0).all()


@SETTINGS
@given(batches(), options)
def test_kl_gradient_vanishes_at_the_reference(batch, opts):
    # d k3 / d logp = 1 - exp(ref - logp) = 0 when ref == logp: the KL term adds nothing to the gradient.
    lp, old, _, adv, mask = batch
    grads = []
    for beta in [0.0, opts["beta"] + 0.5]:
        leaf = lp.clone().requires_grad_(True)
        loss, metrics = grpo_policy_loss(leaf, old, lp.clone(), adv, mask, **{**opts, "beta": beta})
        assert metrics["grpo/kl"].item() == 0.0
        loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@SETTINGS
@given(batches(), options)
def test_on_policy_gradient_is_minus_advantage_times_logprob_gradient(batch, opts):
    # old == new: ratio 1, nothing clipped, and d rho / d logp = 1, so the surrogate's gradient is that of
    # aggregate(-A * logp). Through a linear "LM" (logp = log_softmax(features @ W)[label]).
    lp, _, _, adv, mask = batch
    b, t = lp.shape
    gen = torch.Generator().manual_seed(b * 10 + t)
    features = torch.randn(b, t, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(4, (b, t), generator=gen)
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def logprobs():
        return torch.log_softmax(features @ weight, dim=-1).gather(-1, labels[..., None])[..., 0]

    loss, metrics = grpo_policy_loss(
        logprobs(), logprobs().detach(), None, adv, mask, **{**opts, "beta": 0.0}
    )
    assert metrics["ppo/clipfrac"].item() == 0.0
    expected = aggregate_loss(-adv[:, None] * logprobs(), mask, opts["aggregation"], opts["max_tokens"])
    assert loss.item() == pytest.approx(
        aggregate_loss(-adv[:, None].expand(b, t), mask, opts["aggregation"], opts["max_tokens"]).item(),
        abs=1e-12,
    )
    torch.testing.assert_close(
        torch.autograd.grad(loss, weight)[0], torch.autograd.grad(expected, weight)[0], atol=1e-12, rtol=1e-9
    )


@SETTINGS
@given(batches(rows=st.sampled_from([2, 4, 6])), options)
def test_token_sum_norm_halves_average_to_full_batch(batch, opts):
    # The constant denominator B * max_tokens makes this hold whatever the two halves' masks are.
    lp, old, ref, adv, mask = batch
    opts = {**opts, "aggregation": NORM}
    h = lp.shape[0] // 2
    leaf = lp.clone().requires_grad_(True)
    full = grpo_policy_loss(leaf, old, ref, adv, mask, **opts)[0]
    halves = [
        grpo_policy_loss(leaf[s], old[s], ref[s], adv[s], mask[s], **opts)[0]
        for s in (slice(0, h), slice(h, None))
    ]
    accumulated = (halves[0] + halves[1]) / 2
    assert full.item() == pytest.approx(accumulated.item(), abs=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(accumulated, leaf)[0], torch.autograd.grad(full, leaf)[0], atol=1e-12, rtol=0
    )


def test_the_normaliser_divides_both_the_surrogate_and_the_kl_term():
    lp = LP.clone()
    full, _ = grpo_policy_loss(lp, OLD, REF, ADV, MASK, beta=0.1)
    units = MASK.bool().sum().item()
    doubled, _ = grpo_policy_loss(lp, OLD, REF, ADV, MASK, beta=0.1, normaliser=2 * units)
    assert doubled.item() == pytest.approx(full.item() / 2)
