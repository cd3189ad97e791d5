"""Tests for rlhfkit.core.dpo: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.bradley_terry import bradley_terry_loss
from rlhfkit.core.dpo import DPO_LOSSES, dpo_loss, implicit_rewards, sequence_logps

SETTINGS = settings(max_examples=30, deadline=None)
NAN, INF = float("nan"), float("inf")
GARBAGE = [NAN, INF, -INF, 1e30]
METRIC_NAMES = {
    "dpo/chosen_reward",
    "dpo/rejected_reward",
    "dpo/margin",
    "dpo/accuracy",
    "dpo/logps_chosen",
    "dpo/logps_rejected",
}
betas = st.floats(0.01, 2.0)
smoothings = st.floats(0.0, 0.49)


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


@st.composite
def pairs(draw, min_size=1, max_size=8):
    """Four float64 (B,) tensors: policy chosen, policy rejected, ref chosen, ref rejected log-probs."""
    n = draw(st.integers(min_size, max_size))
    # integers make exact reward ties likely enough to exercise the 0.5 accuracy rule
    logp = st.one_of(st.floats(-30, 0), st.integers(-3, 0).map(float))
    return tuple(f64(draw(st.lists(logp, min_size=n, max_size=n))) for _ in range(4))


@st.composite
def token_batches(draw):
    """float64 token log-probs (B, T) and a bool mask (B, T)."""
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    logps = f64(draw(st.lists(st.floats(-20, 0), min_size=b * t, max_size=b * t))).reshape(b, t)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    return logps, mask


# Naive loop references (plain floats) -------------------------------------------------------------------


def log_sigmoid(z):
    """Stable log(1 / (1 + e^-z)) with math only."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def loop_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """(loss, metrics) by plain loops over the pairs."""
    n = len(pc)
    total = chosen = rejected = margin = acc = lpc = lpr = 0.0
    for p_c, p_r, r_c, r_r in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (p_c - r_c) - (p_r - r_r)
        if loss_type == "sigmoid":
            total += -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        else:
            total += (h - 1 / (2 * beta)) ** 2
        reward_c, reward_r = beta * (p_c - r_c), beta * (p_r - r_r)
        chosen += reward_c
        rejected += reward_r
        margin += reward_c - reward_r
        acc += 1.0 if reward_c > reward_r else 0.5 if reward_c == reward_r else 0.0
        lpc += p_c
        lpr += p_r
    return total / n, {
        "dpo/chosen_reward": chosen / n,
        "dpo/rejected_reward": rejected / n,
        "dpo/margin": margin / n,
        "dpo/accuracy": acc / n,
        "dpo/logps_chosen": lpc / n,
        "dpo/logps_rejected": lpr / n,
    }


def loop_sequence_logps(token_logps, mask, average):
    out = []
    for row, keep in zip(token_logps.tolist(), mask.tolist()):
        kept = [v for v, k in zip(row, keep) if k]
        total = sum(kept)
        out.append(total / len(kept) if average and kept else total)
    return out


# (a) Numbers worked by hand -----------------------------------------------------------------------------

# Pair 0: pi_c - ref_c = -3 - (-4) = 1, pi_r - ref_r = -5 - (-4) = -1 -> h = 2.
# Pair 1: pi_c - ref_c = -2 - (-2) = 0, pi_r - ref_r = -6 - (-6) = 0 -> h = 0.
PC, PR, RC, RR = f64([-3.0, -2.0]), f64([-5.0, -6.0]), f64([-4.0, -2.0]), f64([-4.0, -6.0])


def test_dpo_by_hand():
    # beta = 0.5: beta * h = [1, 0]
    # pair 0: -logsigmoid(1) = log(1 + e^-1) = 0.3132617 ; pair 1: -logsigmoid(0) = log 2 = 0.6931472
    # loss = (0.3132617 + 0.6931472) / 2 = 0.5032044
    # rewards: chosen [0.5, 0] -> 0.25 ; rejected [-0.5, 0] -> -0.25 ; margin [1, 0] -> 0.5
    # accuracy: pair 0 right, pair 1 a tie (0.5) -> 0.75 ; logps chosen (-3 - 2) / 2 = -2.5, rejected -5.5
    loss, metrics = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(0.5032044, abs=1e-7)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2)
    expected = {
        "dpo/chosen_reward": 0.25,
        "dpo/rejected_reward": -0.25,
        "dpo/margin": 0.5,
        "dpo/accuracy": 0.75,
        "dpo/logps_chosen": -2.5,
        "dpo/logps_rejected": -5.5,
    }
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value), name


def test_dpo_single_pair_and_gradient_by_hand():
    # beta = 0.5, h = 2: loss = -logsigmoid(1) = 0.31326169
    # d loss / d pi_c = -beta * sigmoid(-1) = -0.5 * 0.26894142 = -0.13447071 ; d / d pi_r = +0.13447071
    pc, pr = PC[:1].clone().requires_grad_(True), PR[:1].clone().requires_grad_(True)
    loss, _ = dpo_loss(pc, pr, RC[:1], RR[:1], beta=0.5)
    assert loss.item() == pytest.approx(0.31326169, abs=1e-8)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.13447071, abs=1e-8)
    assert pr.grad.item() == pytest.approx(0.13447071, abs=1e-8)


def test_cdpo_by_hand():
    # eps = 0.1, beta = 0.5, h = 2 (z = 1):
    #   0.9 * -logsigmoid(1) + 0.1 * -logsigmoid(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617
    #   = 0.2819355 + 0.1313262 = 0.4132617  (= DPO + eps * z, since -logsigmoid(-z) = -logsigmoid(z) + z)
    loss, _ = dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.4132617, abs=1e-7)
    # pair 1 (h = 0): 0.9 * log 2 + 0.1 * log 2 = log 2 ; batch mean (0.4132617 + 0.6931472) / 2 = 0.5532044
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.5532044, abs=1e-7)


def test_ipo_by_hand():
    # beta = 0.25: target 1 / (2 * 0.25) = 2
    # pair 0: (2 - 2)^2 = 0 ; pair 1: (0 - 2)^2 = 4 ; loss = 2
    # d loss / d pi_c = 2 * (h - 2) / B = [0, 2 * -2 / 2] = [0, -2]
    pc = PC.clone().requires_grad_(True)
    loss, metrics = dpo_loss(pc, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(pc.grad, f64([0.0, -2.0]))
    # the metrics do not depend on the loss type: chosen rewards 0.25 * [1, 0] -> 0.125
    assert metrics["dpo/chosen_reward"].item() == pytest.approx(0.125)
    # beta = 0.5: target 1 ; (2 - 1)^2 = 1 and (0 - 1)^2 = 1 -> loss 1
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)


def test_implicit_rewards_by_hand():
    # beta = 0.1: 0.1 * (-3 - -4) = 0.1 ; 0.1 * (-5 - -4) = -0.1
    torch.testing.assert_close(implicit_rewards(f64([-3.0, -5.0]), f64([-4.0, -4.0]), 0.1), f64([0.1, -0.1]))


def test_sequence_logps_by_hand():
    # row 0 keeps -1, -2 -> sum -3, mean -1.5 ; row 1 keeps -0.5, -1.5 -> sum -2, mean -1 (inf is masked)
    # row 2 keeps nothing -> 0 for both
    token_logps = f64([[-1.0, -2.0, NAN], [-0.5, INF, -1.5], [NAN, -INF, -7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), f64([-3.0, -2.0, 0.0]))
    torch.testing.assert_close(sequence_logps(token_logps, mask.bool(), average=True), f64([-1.5, -1.0, 0.0]))


def test_finite_for_huge_logits():
    # beta = 1, h = +-1000: loss [~e^-1000 = 0, 1000] -> mean 500 (log(sigmoid(-1000)) would be -inf)
    # gradient d/dpi_c = -sigmoid(-z) / 2 = [0, -0.5]
    # cDPO eps = 0.1: [0.1 * 1000, 0.9 * 1000] -> mean 500 as well ; gradient [0.1 / 2, -0.9 / 2]
    for eps, grad in ((0.0, [0.0, -0.5]), (0.1, [0.05, -0.45])):
        for dtype in (torch.float64, torch.float32):
            pc = torch.tensor([1000.0, -1000.0], dtype=dtype, requires_grad=True)
            zeros = torch.zeros(2, dtype=dtype)
            loss, _ = dpo_loss(pc, zeros, zeros, zeros, beta=1.0, label_smoothing=eps)
            assert torch.isfinite(loss) and loss.item() == pytest.approx(500.0)
            loss.backward()
            assert torch.isfinite(pc.grad).all()
            torch.testing.assert_close(pc.grad, torch.tensor(grad, dtype=dtype))
    for dtype in (torch.bfloat16, torch.float16):
        pc = torch.tensor([1000.0, -1000.0], dtype=dtype, requires_grad=True)
        zeros = torch.zeros(2, dtype=dtype)
        loss, metrics = dpo_loss(pc, zeros, zeros, zeros, beta=1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pc.grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())


def test_errors():
    with pytest.raises(ValueError, match=r"unknown DPO loss_type 'hinge'.*\['ipo', 'sigmoid'\]"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")
    with pytest.raises(ValueError, match="shapes"):
        dpo_loss(PC, PR[:1], RC, RR)
    with pytest.raises(ValueError, match="shapes"):
        dpo_loss(PC, PR, RC, RR.reshape(2, 1))
    with pytest.raises(ValueError, match="shapes"):
        dpo_loss(PC.reshape(1, 2), PR.reshape(1, 2), RC.reshape(1, 2), RR.reshape(1, 2))
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(*(torch.zeros(0),) * 4)
    for beta in (0.0, -0.1, NAN, INF):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(PC, PR, RC, RR, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            implicit_rewards(PC, RC, beta)
    for eps in (-0.1, 0.5, 0.7, NAN):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(PC, PR, RC, RR, label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing.*sigmoid"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shapes"):
        implicit_rewards(PC, RC[:1], 0.1)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        sequence_logps(torch.zeros(3), torch.ones(3))


def test_metrics_are_detached_scalars():
    pc = PC.clone().requires_grad_(True)
    for loss_type in sorted(DPO_LOSSES):
        loss, metrics = dpo_loss(pc, PR, RC, RR, loss_type=loss_type)
        assert loss.requires_grad and loss.dim() == 0
        assert set(metrics) == METRIC_NAMES
        for value in metrics.values():
            assert value.dim() == 0 and not value.requires_grad


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(pairs(), betas, st.sampled_from(sorted(DPO_LOSSES)), smoothings)
def test_dpo_matches_loop(batch, beta, loss_type, eps):
    eps = eps if loss_type == "sigmoid" else 0.0
    loss, metrics = dpo_loss(*batch, beta=beta, loss_type=loss_type, label_smoothing=eps)
    ref_loss, ref_metrics = loop_dpo(*batch, beta, loss_type, eps)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-9)
    for name, value in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-9, abs=1e-9), name


@SETTINGS
@given(pairs(), betas)
def test_implicit_rewards_match_loop(batch, beta):
    policy, _, ref, _ = batch
    expected = [beta * (p - r) for p, r in zip(policy.tolist(), ref.tolist())]
    assert implicit_rewards(policy, ref, beta).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@SETTINGS
@given(token_batches(), st.booleans())
def test_sequence_logps_match_loop(batch, average):
    token_logps, mask = batch
    expected = loop_sequence_logps(token_logps, mask, average)
    got = sequence_logps(token_logps, mask, average=average)
    assert got.shape == (token_logps.shape[0],)
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(pairs(), betas, st.sampled_from(sorted(DPO_LOSSES)), st.floats(-100, 100), st.floats(-100, 100))
def test_invariant_to_shifting_policy_and_reference_together(batch, beta, loss_type, shift_c, shift_r):
    # Only log *ratios* enter: a per-response constant added to log pi and log pi_ref (e.g. a different
    # prompt-token count in both) changes neither the loss nor the implicit rewards.
    pc, pr, rc, rr = batch
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    shifted, shifted_metrics = dpo_loss(
        pc + shift_c, pr + shift_r, rc + shift_c, rr + shift_r, beta=beta, loss_type=loss_type
    )
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-9, abs=1e-9)
    for name in ("dpo/chosen_reward", "dpo/rejected_reward", "dpo/margin"):
        assert shifted_metrics[name].item() == pytest.approx(metrics[name].item(), rel=1e-9, abs=1e-9)
    torch.testing.assert_close(
        implicit_rewards(pc + shift_c, rc + shift_c, beta), implicit_rewards(pc, rc, beta)
    )


@SETTINGS
@given(pairs(), betas, smoothings)
def test_swapping_chosen_and_rejected_flips_the_labels(batch, beta, eps):
    # Swapping the responses negates h, and -(1 - eps) ls(-z) - eps ls(z) is the loss with target eps,
    # i.e. the label-flipped loss with smoothing 1 - eps (outside the public range, so computed directly).
    pc, pr, rc, rr = batch
    swapped, swapped_metrics = dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    _, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    h = (pc - rc) - (pr - rr)
    direct = DPO_LOSSES["sigmoid"](h, beta, 1 - eps).mean()
    assert swapped.item() == pytest.approx(direct.item(), rel=1e-9, abs=1e-9)
    flipped_ref, _ = loop_dpo(pc, pr, rc, rr, beta, "sigmoid", 1 - eps)
    assert swapped.item() == pytest.approx(flipped_ref, rel=1e-9, abs=1e-9)
    assert swapped_metrics["dpo/margin"].item() == pytest.approx(-metrics["dpo/margin"].item(), abs=1e-12)
    assert (swapped_metrics["dpo/accuracy"] + metrics["dpo/accuracy"]).item() == pytest.approx(1.0)
    assert swapped_metrics["dpo/chosen_reward"].item() == metrics["dpo/rejected_reward"].item()


@SETTINGS
@given(pairs(), betas)
def test_without_smoothing_is_bradley_terry_on_implicit_rewards(batch, beta):
    pc, pr, rc, rr = batch
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta)
    bt_loss, bt_metrics = bradley_terry_loss(implicit_rewards(pc, rc, beta), implicit_rewards(pr, rr, beta))
    assert loss.item() == pytest.approx(bt_loss.item(), rel=1e-9, abs=1e-9)
    for dpo_name, bt_name in (
        ("dpo/accuracy", "reward/accuracy"),
        ("dpo/margin", "reward/margin"),
        ("dpo/chosen_reward", "reward/chosen"),
        ("dpo/rejected_reward", "reward/rejected"),
    ):
        assert metrics[dpo_name].item() == pytest.approx(bt_metrics[bt_name].item(), rel=1e-9, abs=1e-12)


@SETTINGS
@given(pairs(max_size=4), pairs(max_size=4), betas, st.sampled_from(sorted(DPO_LOSSES)), smoothings)
def test_equal_halves_average_to_full_batch(first, second, beta, loss_type, eps):
    eps = eps if loss_type == "sigmoid" else 0.0
    n = min(len(first[0]), len(second[0]))
    first, second = [t[:n] for t in first], [t[:n] for t in second]
    opts = {"beta": beta, "loss_type": loss_type, "label_smoothing": eps}
    full, full_metrics = dpo_loss(*(torch.cat([a, b]) for a, b in zip(first, second)), **opts)
    (l1, m1), (l2, m2) = dpo_loss(*first, **opts), dpo_loss(*second, **opts)
    assert ((l1 + l2) / 2).item() == pytest.approx(full.item(), rel=1e-12, abs=1e-12)
    for name, value in full_metrics.items():
        assert ((m1[name] + m2[name]) / 2).item() == pytest.approx(value.item(), rel=1e-12, abs=1e-12), name


@SETTINGS
@given(pairs(), betas)
def test_raising_the_chosen_logp_lowers_the_dpo_loss(batch, beta):
    # plain DPO: d loss / d pi_c = -beta * sigmoid(-z) / B < 0 for every pair (|z| <= 2 * 60 here, so
    # sigmoid(-z) > 0 in float64) ; d / d pi_r is its negation ; the reference gets no gradient
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in batch)
    loss, _ = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=beta)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    z = beta * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-z) / len(z))
    torch.testing.assert_close(pr.grad, -pc.grad)


@SETTINGS
@given(pairs(), betas, smoothings, st.sampled_from(sorted(DPO_LOSSES)))
def test_gradient_closed_forms(batch, beta, eps, loss_type):
    # cDPO: d loss / d pi_c = beta * (eps * sigmoid(z) - (1 - eps) * sigmoid(-z)) / B, negative exactly while
    # z < log((1 - eps) / eps): past the target probability 1 - eps, cDPO pushes back.
    # IPO:  d loss / d pi_c = 2 * (h - 1 / (2 beta)) / B, negative exactly while h < 1 / (2 beta).
    eps = eps if loss_type == "sigmoid" else 0.0
    pc = batch[0].clone().requires_grad_(True)
    _, pr, rc, rr = batch
    dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)[0].backward()
    h = ((pc - rc) - (pr - rr)).detach()
    z, n = beta * h, len(h)
    if loss_type == "sigmoid":
        expected = beta * (eps * torch.sigmoid(z) - (1 - eps) * torch.sigmoid(-z)) / n
    else:
        expected = 2 * (h - 1 / (2 * beta)) / n
    torch.testing.assert_close(pc.grad, expected)


@SETTINGS
@given(token_batches(), st.booleans(), st.integers(0, 1000))
def test_masked_tokens_change_nothing(batch, average, seed):
    token_logps, mask = batch
    gen = torch.Generator().manual_seed(seed)
    junk = f64(GARBAGE)[torch.randint(len(GARBAGE), token_logps.shape, generator=gen)]
    dirty = torch.where(mask, token_logps, junk).requires_grad_(True)
    clean = token_logps.clone().requires_grad_(True)
    got, expected = sequence_logps(dirty, mask, average), sequence_logps(clean, mask.to(torch.int64), average)
    assert torch.equal(got.detach(), expected.detach())
    # weights on the rows so the backward pass sees a generic incoming gradient
    weights = torch.arange(1, len(got) + 1, dtype=torch.float64)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.isfinite(dirty.grad).all() and torch.equal(dirty.grad, clean.grad)
    assert (dirty.grad[~mask] == 0).all()


@SETTINGS
@given(token_batches())
def test_mean_is_sum_over_token_count(batch):
    token_logps, mask = batch
    counts = mask.sum(dim=1).clamp(min=1).to(torch.float64)
    torch.testing.assert_close(
        sequence_logps(token_logps, mask, average=True), sequence_logps(token_logps, mask) / counts
    )


@SETTINGS
@given(pairs(), betas, smoothings)
def test_policy_equal_to_reference_is_chance(batch, beta, eps):
    # At the first step the policy is the reference: h = 0, every loss is log 2 (whatever eps), the rewards
    # are all 0 and the accuracy reads 0.5 (ties count half). IPO's loss is the squared target (1/(2 beta))^2.
    pc, pr, _, _ = batch
    loss, metrics = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["dpo/accuracy"].item() == 0.5 and metrics["dpo/margin"].item() == 0.0
    ipo, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((1 / (2 * beta)) ** 2)
