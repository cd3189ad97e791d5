"""Tests for rlhfkit.core.group_advantages: hand-worked numbers, a naive loop reference, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.group_advantages import GROUP_ADVANTAGES, grpo_advantages, rloo_advantages

SETTINGS = settings(max_examples=30, deadline=None)
NAMES = sorted(GROUP_ADVANTAGES)


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


@st.composite
def grouped_rewards(draw, grid=False, min_groups=1):
    """float64 rewards (B,) and the group size K; with ``grid`` the rewards are multiples of 1/4 in [-2, 2],
    so group differences are exact and a group's std is either 0 or at least 1/8 (no rounding trouble)."""
    n_groups, k = draw(st.integers(min_groups, 4)), draw(st.integers(2, 5))
    values = st.integers(-8, 8).map(lambda v: v / 4) if grid else st.floats(-5, 5)
    return f64(draw(st.lists(values, min_size=n_groups * k, max_size=n_groups * k))), k


def by_group(x, k):
    return x.reshape(-1, k)


# Naive loop references -----------------------------------------------------------------------------------


def loop_advantages(rewards, k, name, eps=1e-6):
    """The definitions, one response at a time."""
    r = rewards.tolist()
    out = []
    for start in range(0, len(r), k):
        group = r[start : start + k]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        for i, x in enumerate(group):
            if name == "rloo":
                others = group[:i] + group[i + 1 :]
                out.append(x - sum(others) / (k - 1))
            elif name == "dr_grpo":
                out.append(x - mean)
            else:
                out.append((x - mean) / (std + eps))
    return f64(out)


def loop_metrics(rewards, k):
    groups = [rewards.tolist()[s : s + k] for s in range(0, rewards.numel(), k)]
    stds = []
    for g in groups:
        mean = sum(g) / k
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in g) / (k - 1)))
    return {
        "grpo/reward_mean": sum(rewards.tolist()) / rewards.numel(),
        "grpo/reward_std_within_group": sum(stds) / len(groups),
        "grpo/frac_zero_std_groups": sum(len(set(g)) == 1 for g in groups) / len(groups),
    }


# (a) Numbers worked by hand ----------------------------------------------------------------------------


def test_grpo_by_hand():
    # K = 2, groups [1, 2] and [3, 4]: means 1.5, 3.5; unbiased std sqrt((0.25 + 0.25) / 1) = 1/sqrt(2);
    # A = +-0.5 / (0.7071 + 1e-6) = +-0.7071 (the biased std 0.5 would give +-1)
    adv, metrics = grpo_advantages(f64([1.0, 2.0, 3.0, 4.0]), group_size=2)
    a = 0.5 / (1 / math.sqrt(2) + 1e-6)
    torch.testing.assert_close(adv, f64([-a, a, -a, a]))
    assert a == pytest.approx(0.70710578, abs=1e-8)
    assert metrics["grpo/reward_std_within_group"].item() == pytest.approx(1 / math.sqrt(2))
    assert metrics["grpo/frac_zero_std_groups"].item() == 0.0
    assert metrics["grpo/reward_mean"].item() == pytest.approx(2.5)


def test_grpo_constant_group_by_hand():
    # K = 3: [0, 0, 0] is all-equal (advantages exactly 0); [0, 1, 2] has mean 1, std 1: A = [-1, 0, 1]
    # (up to eps); [0.1, 0.1, 0.1] is all-equal although its float mean is not exactly 0.1
    rewards = f64([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.1, 0.1, 0.1])
    adv, metrics = grpo_advantages(rewards, group_size=3, eps=0.0)
    assert torch.equal(adv, f64([0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert metrics["grpo/frac_zero_std_groups"].item() == pytest.approx(2 / 3)
    assert metrics["grpo/reward_std_within_group"].item() == pytest.approx(1 / 3)


def test_dr_grpo_by_hand():
    # K = 2: no division by the std: [1, 2, 3, 4] -> [-0.5, 0.5, -0.5, 0.5] ; [1, 5] -> [-2, 2]
    adv, _ = grpo_advantages(f64([1.0, 2.0, 3.0, 4.0]), 2, scale_by_std=False)
    assert torch.equal(adv, f64([-0.5, 0.5, -0.5, 0.5]))
    assert torch.equal(GROUP_ADVANTAGES["dr_grpo"](f64([1.0, 5.0]), 2)[0], f64([-2.0, 2.0]))


def test_rloo_by_hand():
    # K = 3, rewards [1, 2, 6]: leave-one-out baselines (2 + 6)/2 = 4, (1 + 6)/2 = 3.5, (1 + 2)/2 = 1.5
    # -> A = [1 - 4, 2 - 3.5, 6 - 1.5] = [-3, -1.5, 4.5] ; = 3/2 * (r - mean 3) = 1.5 * [-2, -1, 3]
    # second group [0, 0, 3]: baselines 1.5, 1.5, 0 -> [-1.5, -1.5, 3]
    adv, metrics = rloo_advantages(f64([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), group_size=3)
    torch.testing.assert_close(adv, f64([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # unbiased stds: sqrt(14 / 2) = sqrt(7) and sqrt(6 / 2) = sqrt(3)
    assert metrics["grpo/reward_std_within_group"].item() == pytest.approx((math.sqrt(7) + math.sqrt(3)) / 2)


def test_registry():
    assert NAMES == ["dr_grpo", "grpo", "rloo"]
    rewards = f64([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert torch.equal(GROUP_ADVANTAGES["grpo"](rewards, 3)[0], grpo_advantages(rewards, 3)[0])
    assert torch.equal(GROUP_ADVANTAGES["rloo"](rewards, 3)[0], rloo_advantages(rewards, 3)[0])
    for name in NAMES:
        adv, metrics = GROUP_ADVANTAGES[name](rewards, 3)
        assert adv.shape == rewards.shape and adv.dtype == torch.float64
        assert set(metrics) == {
            "grpo/reward_mean",
            "grpo/reward_std_within_group",
            "grpo/frac_zero_std_groups",
        }
        for value in metrics.values():
            assert value.dim() == 0 and not value.requires_grad


def test_integer_rewards_and_empty_batch():
    adv, _ = grpo_advantages(torch.tensor([0, 1, 1, 1]), 2)
    assert adv.dtype == torch.get_default_dtype()
    torch.testing.assert_close(adv, torch.tensor([-0.70710, 0.70710, 0.0, 0.0]), atol=1e-4, rtol=0)
    for name in NAMES:
        adv, metrics = GROUP_ADVANTAGES[name](torch.zeros(0), 4)
        assert adv.shape == (0,)
        assert all(value.item() == 0.0 for value in metrics.values())


def test_errors():
    rewards = f64([1.0, 2.0, 3.0, 4.0])
    for name in NAMES:
        with pytest.raises(ValueError, match="multiple of group_size"):
            GROUP_ADVANTAGES[name](rewards, 3)
        for bad in [1, 0, -2, 2.0, True]:
            with pytest.raises(ValueError, match="group_size"):
                GROUP_ADVANTAGES[name](rewards, bad)
        with pytest.raises(ValueError, match="1-D"):
            GROUP_ADVANTAGES[name](rewards.reshape(2, 2), 2)
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(rewards, 2, eps=-1e-6)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(grouped_rewards(), st.sampled_from(NAMES))
def test_matches_loop(batch, name):
    rewards, k = batch
    adv, metrics = GROUP_ADVANTAGES[name](rewards, k)
    # loose only where a near-constant float group makes (r - mean) / std ill-conditioned
    torch.testing.assert_close(adv, loop_advantages(rewards, k, name), atol=1e-6, rtol=1e-6)
    for metric, value in loop_metrics(rewards, k).items():
        assert metrics[metric].item() == pytest.approx(value, abs=1e-9), metric


@SETTINGS
@given(grouped_rewards(grid=True), st.sampled_from(NAMES))
def test_matches_loop_on_a_grid(batch, name):
    rewards, k = batch
    torch.testing.assert_close(
        GROUP_ADVANTAGES[name](rewards, k)[0], loop_advantages(rewards, k, name), atol=1e-12, rtol=0
    )


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(grouped_rewards(), st.sampled_from(NAMES))
def test_advantages_sum_to_zero_within_each_group(batch, name):
    rewards, k = batch
    adv, _ = GROUP_ADVANTAGES[name](rewards, k)
    # exact up to the rounding of the mean, which GRPO divides by std + eps >= 1e-6
    assert by_group(adv, k).sum(dim=1).abs().max().item() <= 1e-8


@SETTINGS
@given(grouped_rewards(grid=True), st.sampled_from(NAMES), st.integers(-8, 8), st.data())
def test_adding_a_constant_to_a_group_changes_nothing(batch, name, shift, data):
    rewards, k = batch
    group = data.draw(st.integers(0, rewards.numel() // k - 1))
    shifted = rewards.clone()
    shifted[group * k : (group + 1) * k] += shift / 4  # stays on the grid: exact
    torch.testing.assert_close(
        GROUP_ADVANTAGES[name](shifted, k)[0], GROUP_ADVANTAGES[name](rewards, k)[0], atol=1e-12, rtol=0
    )


@SETTINGS
@given(grouped_rewards(grid=True), st.sampled_from([0.25, 0.5, 3.0, 1024.0]), st.data())
def test_grpo_is_invariant_to_scaling_a_group(batch, c, data):
    # With eps = 0 the std-normalised advantages do not see the reward scale (with eps > 0 only nearly).
    rewards, k = batch
    group = data.draw(st.integers(0, rewards.numel() // k - 1))
    scaled = rewards.clone()
    scaled[group * k : (group + 1) * k] *= c
    adv = grpo_advantages(rewards, k, eps=0.0)[0]
    torch.testing.assert_close(grpo_advantages(scaled, k, eps=0.0)[0], adv, atol=1e-12, rtol=1e-12)
    # Dr. GRPO and RLOO scale with the rewards instead
    for name in ["dr_grpo", "rloo"]:
        base, out = GROUP_ADVANTAGES[name](rewards, k)[0], GROUP_ADVANTAGES[name](scaled, k)[0]
        rows = slice(group * k, (group + 1) * k)
        torch.testing.assert_close(out[rows], c * base[rows], atol=1e-12, rtol=1e-12)


@SETTINGS
@given(grouped_rewards(grid=True), st.sampled_from(NAMES), st.randoms(use_true_random=False))
def test_permuting_a_group_permutes_its_advantages(batch, name, rng):
    rewards, k = batch
    order = []
    for start in range(0, rewards.numel(), k):
        block = list(range(start, start + k))
        rng.shuffle(block)
        order += block
    adv = GROUP_ADVANTAGES[name](rewards, k)[0]
    torch.testing.assert_close(GROUP_ADVANTAGES[name](rewards[order], k)[0], adv[order], atol=1e-12, rtol=0)


@SETTINGS
@given(grouped_rewards(min_groups=2), st.sampled_from(NAMES), st.data())
def test_groups_are_independent(batch, name, data):
    rewards, k = batch
    changed = rewards.clone()
    new = data.draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k))
    changed[k : 2 * k] = f64(new)  # group 2 only
    before, after = GROUP_ADVANTAGES[name](rewards, k)[0], GROUP_ADVANTAGES[name](changed, k)[0]
    assert torch.equal(before[:k], after[:k]) and torch.equal(before[2 * k :], after[2 * k :])


@SETTINGS
@given(grouped_rewards())
def test_rloo_is_dr_grpo_times_k_over_k_minus_1(batch):
    rewards, k = batch
    torch.testing.assert_close(
        rloo_advantages(rewards, k)[0],
        k / (k - 1) * grpo_advantages(rewards, k, scale_by_std=False)[0],
        atol=1e-12,
        rtol=1e-12,
    )


@SETTINGS
@given(grouped_rewards(grid=True), st.sampled_from(NAMES))
def test_constant_groups_give_exactly_zero_and_are_counted(batch, name):
    rewards, k = batch
    groups = by_group(rewards, k).clone()
    groups[0] = groups[0, 0]  # make the first group constant
    adv, metrics = GROUP_ADVANTAGES[name](groups.reshape(-1), k)
    constant = (groups == groups[:, :1]).all(dim=1)
    assert (by_group(adv, k)[constant] == 0).all()
    assert (by_group(adv, k)[~constant].abs().sum(dim=1) > 0).all()
    assert metrics["grpo/frac_zero_std_groups"].item() == pytest.approx(constant.double().mean().item())


@SETTINGS
@given(grouped_rewards(grid=True))
def test_grpo_unit_std_within_non_constant_groups(batch):
    # Dividing by the unbiased std gives each non-constant group an unbiased std of 1 (eps = 0).
    rewards, k = batch
    adv = by_group(grpo_advantages(rewards, k, eps=0.0)[0], k)
    constant = (by_group(rewards, k) == by_group(rewards, k)[:, :1]).all(dim=1)
    for row in adv[~constant]:
        assert row.std().item() == pytest.approx(1.0, abs=1e-12)
