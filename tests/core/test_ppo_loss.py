"""Tests for rlhfkit.core.ppo_loss: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.logprobs import logprobs_from_logits
from rlhfkit.core.ppo_loss import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    explained_variance,
    loss_units,
    ppo_policy_loss,
    ppo_value_loss,
)

SETTINGS = settings(max_examples=50, deadline=None)
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30]
NAN = float("nan")
AGGREGATIONS = sorted(LOSS_AGGREGATIONS)


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


@st.composite
def batches(draw, n=3, low=-2.0, high=2.0):
    """``n`` float64 (B, T) tensors with entries in [low, high] and a bool mask (B, T)."""
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    tensors = [
        f64(draw(st.lists(st.floats(low, high), min_size=b * t, max_size=b * t))).reshape(b, t)
        for _ in range(n)
    ]
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    return (*tensors, mask)


policy_options = st.fixed_dictionaries(
    {
        "clip_eps": st.floats(0.05, 0.5),
        "clip_eps_low": st.one_of(st.none(), st.floats(0.0, 0.5)),
        "clip_eps_high": st.one_of(st.none(), st.floats(0.0, 0.5)),
        "dual_clip": st.one_of(st.none(), st.floats(1.5, 5)),
        "aggregation": st.sampled_from(AGGREGATIONS),
        "max_tokens": st.integers(1, 8),  # used by seq-mean-token-sum-norm only
    }
)


def with_garbage(x, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(len(GARBAGE), x.shape, generator=gen)]
    return torch.where(mask, x, junk)


# Naive loop references -----------------------------------------------------------------------------------


def loop_aggregate(losses, mask, aggregation, max_tokens=None):
    rows = [[v for v, m in zip(lr, mr) if m] for lr, mr in zip(losses, mask.tolist())]
    if aggregation == "token-mean":
        tokens = [v for row in rows for v in row]
        return sum(tokens) / len(tokens) if tokens else 0.0
    if aggregation == "seq-mean-token-sum-norm":
        # every row counts, empty ones included: each token weighs 1 / (B * max_tokens)
        per_row = [sum(row) / max_tokens for row in rows]
        return sum(per_row) / len(per_row) if per_row else 0.0
    rows = [row for row in rows if row]
    per_row = [sum(row) if aggregation == "seq-mean-token-sum" else sum(row) / len(row) for row in rows]
    return sum(per_row) / len(per_row) if per_row else 0.0


def loop_policy(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_eps,
    clip_eps_low,
    clip_eps_high,
    dual_clip,
    aggregation,
    max_tokens=None,
):
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    losses, clipped, kls, ratios = [], [], [], []
    for i in range(logprobs.shape[0]):
        row = []
        for t in range(logprobs.shape[1]):
            ratio = math.exp(logprobs[i, t].item() - old_logprobs[i, t].item())
            a = advantages[i, t].item()
            pg1, pg2 = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
            loss = max(pg1, pg2)
            if dual_clip is not None and a < 0:
                loss = min(loss, -a * dual_clip)
            row.append(loss)
            if mask[i, t]:
                clipped.append(pg2 > pg1)
                kls.append(ratio - 1 - math.log(ratio))
                ratios.append(ratio)
        losses.append(row)
    n = max(len(ratios), 1)
    return loop_aggregate(losses, mask, aggregation, max_tokens), {
        "ppo/clipfrac": sum(clipped) / n,
        "ppo/approx_kl": sum(kls) / n,
        "ppo/ratio_mean": sum(ratios) / n,
    }


def loop_value(values, old_values, returns, mask, clip):
    losses, clipped = [], []
    for i in range(values.shape[0]):
        row = []
        for t in range(values.shape[1]):
            v, old, r = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            vf1 = (v - r) ** 2
            vf2 = vf1 if clip is None else (min(max(v, old - clip), old + clip) - r) ** 2
            row.append(max(vf1, vf2))
            if mask[i, t]:
                clipped.append(vf2 > vf1)
        losses.append(row)
    return 0.5 * loop_aggregate(losses, mask, "token-mean"), sum(clipped) / max(len(clipped), 1)


def loop_explained_variance(values, returns, mask):
    pairs = [
        (v, r)
        for v, r, m in zip(values.flatten().tolist(), returns.flatten().tolist(), mask.flatten().tolist())
        if m
    ]
    if not pairs:
        return 0.0

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    var_r = var([r for _, r in pairs])
    return 0.0 if var_r == 0 else 1 - var([r - v for v, r in pairs]) / var_r


# (a) Numbers worked by hand ----------------------------------------------------------------------------

# Four tokens, eps 0.2, old log-probs 0, so ratio = exp(logprobs):
#   ratio 1.5, A +1: pg1 = -1.5, pg2 = -1.2 -> -1.2 (clipped)
#   ratio 0.5, A +1: pg1 = -0.5, pg2 = -0.8 -> -0.5
#   ratio 1.5, A -1: pg1 =  1.5, pg2 =  1.2 ->  1.5
#   ratio 0.5, A -1: pg1 =  0.5, pg2 =  0.8 ->  0.8 (clipped)
# token-mean (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15 ; clipfrac 2/4 ; ratio mean (1.5 + 0.5 + 1.5 + 0.5) / 4 = 1
# approx_kl (k3) = mean of (rho - 1) - log rho: 1.5 -> 0.5 - ln 1.5 ; 0.5 -> -0.5 + ln 2
RATIOS = [1.5, 0.5, 1.5, 0.5]
LOGPROBS = f64([[math.log(r) for r in RATIOS]])
ZEROS = torch.zeros(1, 4, dtype=torch.float64)
ADV = f64([[1.0, 1.0, -1.0, -1.0]])
ALL = torch.ones(1, 4, dtype=torch.bool)


def test_policy_loss_by_hand():
    loss, metrics = ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert metrics["ppo/clipfrac"].item() == pytest.approx(0.5)
    assert metrics["ppo/ratio_mean"].item() == pytest.approx(1.0)
    expected_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2))) / 4
    assert metrics["ppo/approx_kl"].item() == pytest.approx(expected_kl)
    assert metrics["ppo/policy_loss"].item() == pytest.approx(0.15)
    assert metrics["ppo/dual_clipfrac"].item() == 0.0


def test_policy_gradient_by_hand():
    # d loss / d logprob = d(-A * rho)/d logprob / 4 = -A * rho / 4 on unclipped tokens, 0 on clipped ones:
    # [0, -0.5/4, 1.5/4, 0]
    logprobs = LOGPROBS.clone().requires_grad_(True)
    ppo_policy_loss(logprobs, ZEROS, ADV, ALL)[0].backward()
    torch.testing.assert_close(logprobs.grad, f64([[0.0, -0.125, 0.375, 0.0]]))


def test_clip_higher_by_hand():
    # ratio 1.25, A +1: eps 0.2 clips at 1.2 (loss -1.2); eps_high 0.28 leaves it (loss -1.25)
    lp, old, adv, mask = f64([[math.log(1.25)]]), f64([[0.0]]), f64([[1.0]]), torch.ones(1, 1)
    assert ppo_policy_loss(lp, old, adv, mask)[0].item() == pytest.approx(-1.2)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and metrics["ppo/clipfrac"].item() == 0.0
    # eps_low only matters below 1: ratio 0.75, A -1: eps 0.2 -> max(0.75, 0.8) = 0.8 ; eps_low 0.3 -> 0.75
    lp = f64([[math.log(0.75)]])
    assert ppo_policy_loss(lp, old, -adv, mask)[0].item() == pytest.approx(0.8)
    assert ppo_policy_loss(lp, old, -adv, mask, clip_eps_low=0.3)[0].item() == pytest.approx(0.75)


def test_dual_clip_by_hand():
    # c = 3, eps 0.2:
    #   ratio 5, A -1: max(5, 1.2) = 5 -> min(5, 3) = 3 (dual clip active, zero gradient)
    #   ratio 2, A -1: max(2, 1.2) = 2 < 3 -> 2
    #   ratio 5, A +1: max(-5, -1.2) = -1.2 (ordinary clip; dual clip only for A < 0)
    # mean (3 + 2 - 1.2) / 3 = 3.8 / 3 ; dual_clipfrac 1/3 ; clipfrac 1/3 (only the third token)
    lp = f64([[math.log(5), math.log(2), math.log(5)]]).requires_grad_(True)
    old, adv, mask = torch.zeros(1, 3, dtype=torch.float64), f64([[-1.0, -1.0, 1.0]]), torch.ones(1, 3)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.8 / 3)
    assert metrics["ppo/dual_clipfrac"].item() == pytest.approx(1 / 3)
    assert metrics["ppo/clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # only the middle token has a gradient: -A * rho / 3 = 2 / 3
    torch.testing.assert_close(lp.grad, f64([[0.0, 2 / 3, 0.0]]))
    # without dual clip the first token costs 5: (5 + 2 - 1.2) / 3
    assert ppo_policy_loss(lp, old, adv, mask)[0].item() == pytest.approx(5.8 / 3)


def test_aggregations_by_hand():
    losses = f64([[1.0, 2.0, 3.0], [4.0, NAN, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # token-mean (1 + 2 + 3 + 4) / 4 = 2.5 ; the empty third row is not a response:
    # seq-mean-token-sum (6 + 4) / 2 = 5 ; seq-mean-token-mean (2 + 4) / 2 = 3
    assert aggregate_loss(losses, mask, "token-mean").item() == pytest.approx(2.5)
    assert aggregate_loss(losses, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)
    assert aggregate_loss(losses, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    # seq-mean-token-sum-norm with max_tokens 4: every row counts, the empty one too:
    # (6 / 4 + 4 / 4 + 0 / 4) / 3 = 2.5 / 3
    assert aggregate_loss(losses, mask, "seq-mean-token-sum-norm", max_tokens=4).item() == pytest.approx(
        2.5 / 3
    )
    # max_tokens is ignored by the other modes
    assert aggregate_loss(losses, mask, "token-mean", max_tokens=4).item() == pytest.approx(2.5)
    for name in AGGREGATIONS:
        assert aggregate_loss(losses, torch.zeros_like(mask), name, max_tokens=4).item() == 0.0


def test_loss_units_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert loss_units(mask, "token-mean").item() == 4.0  # real tokens
    assert loss_units(mask, "seq-mean-token-sum").item() == 2.0  # responses with a real token
    assert loss_units(mask, "seq-mean-token-mean").item() == 2.0
    assert loss_units(mask, "seq-mean-token-sum-norm").item() == 3.0  # rows
    with pytest.raises(ValueError, match="aggregation"):
        loss_units(mask, "sum")


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_unequal_micro_batches_with_the_global_normaliser_add_up_to_the_whole_batch(name):
    """Micro-batches of 1, 2 and 4 rows (one of them all padding), each divided by the units of the whole
    mini-batch: their losses and gradients sum to those of one pass over the mini-batch. Divided by their own
    units instead (a mean per micro-batch), they would not: token-mean would weigh the 1-row batch's tokens
    more."""
    gen = torch.Generator().manual_seed(0)
    losses = torch.randn(7, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = (torch.rand(7, 5, generator=gen) > 0.4).long()
    mask[3] = 0  # an empty response inside the middle micro-batch
    parts = [slice(0, 1), slice(1, 3), slice(3, 7)]
    whole = aggregate_loss(losses, mask, name, max_tokens=5)
    (whole_grad,) = torch.autograd.grad(whole, losses)
    total = sum(loss_units(mask[p], name) for p in parts)
    assert total == loss_units(mask, name)
    summed = sum(aggregate_loss(losses[p], mask[p], name, max_tokens=5, normaliser=total) for p in parts)
    (summed_grad,) = torch.autograd.grad(summed, losses)
    torch.testing.assert_close(summed, whole)
    torch.testing.assert_close(summed_grad, whole_grad)
    means = sum(aggregate_loss(losses[p], mask[p], name, max_tokens=5) for p in parts) / len(parts)
    assert not torch.isclose(means, whole)


def test_policy_and_value_losses_pass_the_normaliser_on():
    # 4 real tokens of ALL; dividing by 8 instead halves both losses
    half, _ = ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, normaliser=8.0)
    assert half.item() == pytest.approx(ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL)[0].item() / 2)
    v_half, _ = ppo_value_loss(ZEROS, ZEROS, ADV, ALL, normaliser=8.0)
    assert v_half.item() == pytest.approx(ppo_value_loss(ZEROS, ZEROS, ADV, ALL)[0].item() / 2)


def test_token_sum_norm_has_no_length_bias_by_hand():
    # One response of 1 token and one of 4, every token loss 1, max_tokens 4. The original GRPO mean
    # (seq-mean-token-mean) gives the short response's token weight 1/2 and each long one's 1/8; the
    # normalised sum gives every token 1 / (2 * 4) = 1/8, so the loss is 5/8 and the gradient uniform.
    losses = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    loss = aggregate_loss(losses, mask, "seq-mean-token-sum-norm", max_tokens=4)
    assert loss.item() == pytest.approx(5 / 8)
    loss.backward()
    torch.testing.assert_close(losses.grad, mask.to(torch.float64) / 8)
    losses.grad = None
    aggregate_loss(losses, mask, "seq-mean-token-mean").backward()
    torch.testing.assert_close(losses.grad, f64([[0.5, 0, 0, 0], [0.125, 0.125, 0.125, 0.125]]))


def test_token_sum_norm_needs_max_tokens():
    losses, mask = f64([[1.0, 2.0]]), torch.ones(1, 2)
    for bad in [None, 0, -3, 2.5, True]:
        with pytest.raises(ValueError, match="max_tokens"):
            aggregate_loss(losses, mask, "seq-mean-token-sum-norm", max_tokens=bad)
    with pytest.raises(ValueError, match="max_tokens"):
        ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_tokens"):
        ppo_value_loss(ZEROS, ZEROS, ADV, ALL, aggregation="seq-mean-token-sum-norm")
    # forwarded by both losses: 0.15 * 4 tokens / (1 row * 8) = 0.075
    loss, _ = ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, aggregation="seq-mean-token-sum-norm", max_tokens=8)
    assert loss.item() == pytest.approx(0.075)
    # value loss: 0.5 * (4 real tokens, each (0 - (+-1))^2 = 1) / (1 row * 4) = 0.5
    v_loss, _ = ppo_value_loss(ZEROS, ZEROS, ADV, ALL, aggregation="seq-mean-token-sum-norm", max_tokens=4)
    assert v_loss.item() == pytest.approx(0.5 * 4 / 4)


def test_value_loss_by_hand():
    # c = 0.2:
    #   V 1.5, V_old 1, R 2: vf1 = 0.25 ; V_clip = 1.2, vf2 = 0.64 -> 0.64 (clipped)
    #   V 0,   V_old 1, R 1: vf1 = 1    ; V_clip = 0.8, vf2 = 0.04 -> 1
    # loss = 0.5 * (0.64 + 1) / 2 = 0.41 ; clipfrac 1/2 ; value mean 0.75 ; unclipped 0.5 * 1.25 / 2 = 0.3125
    values = f64([[1.5, 0.0]]).requires_grad_(True)
    old, returns, mask = f64([[1.0, 1.0]]), f64([[2.0, 1.0]]), torch.ones(1, 2)
    loss, metrics = ppo_value_loss(values, old, returns, mask, value_clip=0.2)
    assert loss.item() == pytest.approx(0.41)
    assert metrics["ppo/value_clipfrac"].item() == pytest.approx(0.5)
    assert metrics["ppo/value_mean"].item() == pytest.approx(0.75)
    assert metrics["loss/value"].item() == pytest.approx(0.41)
    loss.backward()
    # clipped token: no gradient ; other: 0.5 * 2 * (0 - 1) / 2 = -0.5
    torch.testing.assert_close(values.grad, f64([[0.0, -0.5]]))
    unclipped, metrics = ppo_value_loss(values, old, returns, mask, value_clip=None)
    assert unclipped.item() == pytest.approx(0.3125) and metrics["ppo/value_clipfrac"].item() == 0.0


def test_value_clipfrac_counts_no_token_inside_the_clip_range_in_float32():
    """V 0.21, V_old 0.04, R 1.84, c 0.5: V moved 0.17 < c, so nothing is clipped. Clipping as V_old + clamp(V - V_old)
    rounds in float32 to a value one ulp away from V, whose error then looks larger: a clip fraction of 1 where verl
    and TRL report 0."""
    values = torch.tensor([[0.21]], dtype=torch.float32, requires_grad=True)
    old, returns, mask = torch.tensor([[0.04]]), torch.tensor([[1.84]]), torch.ones(1, 1)
    assert (old + (values - old).clamp(-0.5, 0.5)).item() != values.item()  # the rounding this guards against
    loss, metrics = ppo_value_loss(values, old, returns, mask, value_clip=0.5)
    assert metrics["ppo/value_clipfrac"].item() == 0.0
    assert loss.item() == 0.5 * (values - returns).square().item()
    loss.backward()
    torch.testing.assert_close(values.grad, values.detach() - returns)  # the unclipped gradient, in full
    # Many unclipped tokens of float32 magnitudes: none counted.
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(64, 32, generator=gen)
    values = old + (torch.rand(64, 32, generator=gen) - 0.5) * 0.9  # |V - V_old| < 0.45 < c
    returns = torch.randn(64, 32, generator=gen) * 3
    _, metrics = ppo_value_loss(values, old, returns, torch.ones(64, 32), value_clip=0.5)
    assert metrics["ppo/value_clipfrac"].item() == 0.0


def test_explained_variance_by_hand():
    returns, mask = f64([[1.0, 2.0, 3.0, NAN]]), torch.tensor([[1, 1, 1, 0]])
    # perfect -> 1 ; constant 2 = the mean -> residual var = var(R) -> 0 ; reversed [3, 2, 1]:
    # residual [-2, 0, 2], var 8/3 over var(R) 2/3 = 4 -> 1 - 4 = -3
    assert explained_variance(f64([[1.0, 2.0, 3.0, NAN]]), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(f64([[2.0, 2.0, 2.0, 9.0]]), returns, mask).item() == pytest.approx(0.0)
    assert explained_variance(f64([[3.0, 2.0, 1.0, 0.0]]), returns, mask).item() == pytest.approx(-3.0)
    # constant returns: undefined ratio -> 0, not NaN
    assert explained_variance(f64([[0.0, 5.0]]), f64([[1.0, 1.0]]), torch.ones(1, 2)).item() == 0.0


def test_metrics_are_detached_scalars():
    lp = LOGPROBS.clone().requires_grad_(True)
    loss, metrics = ppo_policy_loss(lp, ZEROS, ADV, ALL)
    assert loss.requires_grad and loss.dim() == 0
    assert set(metrics) == {
        "ppo/clipfrac",
        "ppo/dual_clipfrac",
        "ppo/approx_kl",
        "ppo/ratio_mean",
        "ppo/policy_loss",
    }
    values = ZEROS.clone().requires_grad_(True)
    _, v_metrics = ppo_value_loss(values, ZEROS, ADV, ALL)
    assert set(v_metrics) == {"ppo/value_clipfrac", "loss/value", "ppo/value_mean"}
    ev = explained_variance(values, ADV, ALL)
    for value in [*metrics.values(), *v_metrics.values(), ev]:
        assert value.dim() == 0 and not value.requires_grad


def test_errors():
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, dual_clip=1.0)
    with pytest.raises(ValueError):
        ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, clip_eps=-0.1)
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(LOGPROBS, ZEROS, ADV, ALL, aggregation="sum")
    with pytest.raises(ValueError):
        ppo_policy_loss(LOGPROBS, ZEROS[:, :2], ADV, ALL)
    with pytest.raises(ValueError):
        ppo_value_loss(ZEROS, ZEROS, ZEROS, ALL, value_clip=-1.0)
    with pytest.raises(ValueError):
        explained_variance(ZEROS, ZEROS[:, :1], ALL)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(batches(), policy_options)
def test_policy_loss_matches_loop(batch, opts):
    lp, old, adv, mask = batch
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, **opts)
    ref_loss, ref_metrics = loop_policy(lp, old, adv, mask, **opts)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-9)
    for name, value in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-9), name


@SETTINGS
@given(batches(), st.one_of(st.none(), st.floats(0, 1)))
def test_value_loss_matches_loop(batch, clip):
    values, old, returns, mask = batch
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip)
    ref_loss, ref_clipfrac = loop_value(values, old, returns, mask, clip)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-9)
    assert metrics["ppo/value_clipfrac"].item() == pytest.approx(ref_clipfrac, abs=1e-9)


@SETTINGS
@given(batches(n=2))
def test_explained_variance_matches_loop(batch):
    values, returns, mask = batch
    assert explained_variance(values, returns, mask).item() == pytest.approx(
        loop_explained_variance(values, returns, mask), abs=1e-9
    )


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(batches(), policy_options, st.integers(0, 1000))
def test_policy_masked_garbage_changes_nothing(batch, opts, seed):
    lp, old, adv, mask = batch
    dirty = with_garbage(lp, mask, seed).requires_grad_(True)
    loss, metrics = ppo_policy_loss(
        dirty, with_garbage(old, mask, seed + 1), with_garbage(adv, mask, seed + 2), mask, **opts
    )
    clean = lp.clone().requires_grad_(True)
    clean_loss, clean_metrics = ppo_policy_loss(clean, old, adv, mask, **opts)
    assert torch.equal(loss.detach(), clean_loss.detach())
    for name in metrics:
        assert torch.equal(metrics[name], clean_metrics[name]), name
    loss.backward()
    clean_loss.backward()
    assert torch.equal(dirty.grad, clean.grad) and (dirty.grad[~mask] == 0).all()


@SETTINGS
@given(batches(), st.one_of(st.none(), st.floats(0, 1)), st.integers(0, 1000))
def test_value_masked_garbage_changes_nothing(batch, clip, seed):
    values, old, returns, mask = batch
    dirty = with_garbage(values, mask, seed).requires_grad_(True)
    loss, metrics = ppo_value_loss(
        dirty, with_garbage(old, mask, seed + 1), with_garbage(returns, mask, seed + 2), mask, clip
    )
    clean = values.clone().requires_grad_(True)
    clean_loss, clean_metrics = ppo_value_loss(clean, old, returns, mask, clip)
    assert torch.equal(loss.detach(), clean_loss.detach())
    for name in metrics:
        assert torch.equal(metrics[name], clean_metrics[name]), name
    loss.backward()
    clean_loss.backward()
    assert torch.equal(dirty.grad, clean.grad) and (dirty.grad[~mask] == 0).all()
    assert torch.equal(
        explained_variance(dirty, with_garbage(returns, mask, seed), mask),
        explained_variance(values, returns, mask),
    )


@SETTINGS
@given(batches(), policy_options)
def test_clipped_tokens_have_zero_gradient(batch, opts):
    lp, old, adv, mask = batch
    lp = lp.clone().requires_grad_(True)
    ppo_policy_loss(lp, old, adv, mask, **opts)[0].backward()
    low = opts["clip_eps"] if opts["clip_eps_low"] is None else opts["clip_eps_low"]
    high = opts["clip_eps"] if opts["clip_eps_high"] is None else opts["clip_eps_high"]
    ratio = torch.exp(lp.detach() - old)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    assert (lp.grad[mask & (pg2 > pg1)] == 0).all()


@SETTINGS
@given(batches(n=2), policy_options)
def test_on_policy_loss_is_minus_mean_advantage(batch, opts):
    # ratio = 1 everywhere: nothing is clipped, loss = aggregate(-A), gradient d/dlp = -A weighted as the loss
    lp, adv, mask = batch
    loss, metrics = ppo_policy_loss(lp, lp.clone(), adv, mask, **opts)
    expected = aggregate_loss(-adv, mask, opts["aggregation"], opts["max_tokens"])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert metrics["ppo/clipfrac"].item() == 0.0 and metrics["ppo/approx_kl"].item() == 0.0
    assert metrics["ppo/ratio_mean"].item() == (1.0 if mask.any() else 0.0)


@SETTINGS
@given(batches(n=2), st.sampled_from(AGGREGATIONS))
def test_value_loss_without_clipping_is_half_mse(batch, aggregation):
    values, returns, mask = batch
    loss, _ = ppo_value_loss(values, values + 7.0, returns, mask, None, aggregation, max_tokens=5)
    assert loss.item() == pytest.approx(
        0.5 * aggregate_loss((values - returns) ** 2, mask, aggregation, max_tokens=5).item(), abs=1e-12
    )


@SETTINGS
@given(batches(n=1), st.sampled_from(AGGREGATIONS), st.integers(1, 8))
def test_aggregate_matches_loop(batch, aggregation, max_tokens):
    losses, mask = batch
    assert aggregate_loss(losses, mask, aggregation, max_tokens).item() == pytest.approx(
        loop_aggregate(losses.tolist(), mask, aggregation, max_tokens), abs=1e-12
    )


@SETTINGS
@given(batches(n=1), st.sampled_from(AGGREGATIONS), st.integers(1, 8), st.integers(0, 1000))
def test_aggregate_masked_garbage_changes_nothing(batch, aggregation, max_tokens, seed):
    losses, mask = batch
    dirty = with_garbage(losses, mask, seed).requires_grad_(True)
    clean = losses.clone().requires_grad_(True)
    dirty_loss = aggregate_loss(dirty, mask, aggregation, max_tokens)
    clean_loss = aggregate_loss(clean, mask, aggregation, max_tokens)
    assert torch.equal(dirty_loss.detach(), clean_loss.detach())
    dirty_loss.backward()
    clean_loss.backward()
    assert torch.equal(dirty.grad, clean.grad) and (dirty.grad[~mask] == 0).all()


@SETTINGS
@given(batches(n=2), st.integers(1, 8))
def test_token_sum_norm_halves_average_to_full_batch_for_any_masks(batch, max_tokens):
    # The constant denominator makes this hold for any two equal-height halves, whatever their masks
    # (token-mean and the other seq-means need matched token or row counts, see the next test).
    x1, x2, m1 = batch
    m2 = m1.flip(1) & torch.rand(m1.shape, generator=torch.Generator().manual_seed(m1.numel())).lt(0.5)
    mode = "seq-mean-token-sum-norm"
    full = aggregate_loss(torch.cat([x1, x2]), torch.cat([m1, m2]), mode, max_tokens)
    halves = (aggregate_loss(x1, m1, mode, max_tokens) + aggregate_loss(x2, m2, mode, max_tokens)) / 2
    assert full.item() == pytest.approx(halves.item(), abs=1e-12)


@SETTINGS
@given(batches(n=1))
def test_token_sum_norm_equals_the_means_for_full_length_rows(batch):
    # Every row has exactly max_tokens real tokens: all the per-token weights are 1 / (B * max_tokens).
    losses, _ = batch
    mask = torch.ones_like(losses, dtype=torch.bool)
    norm = aggregate_loss(losses, mask, "seq-mean-token-sum-norm", max_tokens=losses.shape[1])
    for name in ["token-mean", "seq-mean-token-mean"]:
        assert norm.item() == pytest.approx(aggregate_loss(losses, mask, name).item(), abs=1e-12)


@SETTINGS
@given(batches(n=2), st.sampled_from(AGGREGATIONS), st.randoms(use_true_random=False))
def test_halves_average_to_full_batch(batch, aggregation, rng):
    # The second half's mask is a row permutation of the first's, so the halves have equal token counts
    # (what token-mean needs) and equal numbers of non-empty rows (what the seq-means need).
    x1, x2, m1 = batch
    order = list(range(m1.shape[0]))
    rng.shuffle(order)
    m2 = m1[order]
    full = aggregate_loss(torch.cat([x1, x2]), torch.cat([m1, m2]), aggregation, max_tokens=6)
    halves = (aggregate_loss(x1, m1, aggregation, 6) + aggregate_loss(x2, m2, aggregation, 6)) / 2
    assert full.item() == pytest.approx(halves.item(), abs=1e-12)


def _tiny_lm_batch(seed, batch=4, seq=5, hidden=4, vocab=7):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64)
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    weight = torch.randn(hidden, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    old = (
        logprobs_from_logits(features @ weight, labels) + 0.3 * torch.randn(batch, seq, generator=gen)
    ).detach()
    adv = torch.randn(batch, seq, generator=gen, dtype=torch.float64)
    # The second half's mask is a shuffle of the first's: equal token counts in the two micro-batches.
    first = torch.rand(batch // 2, seq, generator=gen) < 0.6
    second = first.flatten()[torch.randperm(first.numel(), generator=gen)].reshape(first.shape)
    return features, labels, weight, old, adv, torch.cat([first, second])


@SETTINGS
@given(st.integers(0, 10_000), st.booleans())
def test_gradient_accumulation_equals_one_big_batch(seed, dual):
    # A linear "LM" (features @ W -> logits). With token-mean and equal token counts per micro-batch, the
    # mean of the two micro-batch gradients equals the full-batch gradient.
    features, labels, weight, old, adv, mask = _tiny_lm_batch(seed)
    opts = {"dual_clip": 3.0 if dual else None}

    def grad(rows):
        logprobs = logprobs_from_logits(features[rows] @ weight, labels[rows])
        loss = ppo_policy_loss(logprobs, old[rows], adv[rows], mask[rows], **opts)[0]
        return torch.autograd.grad(loss, weight)[0]

    full = grad(slice(None))
    accumulated = (grad(slice(0, 2)) + grad(slice(2, 4))) / 2
    torch.testing.assert_close(accumulated, full)
