"""Tests for rlhfkit.core.gae: hand-worked numbers, a naive loop reference, and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.gae import gae_advantages, whiten_advantages
from rlhfkit.core.masked import masked_mean, masked_var, masked_whiten

SETTINGS = settings(max_examples=50, deadline=None)
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30]
NAN, INF = float("nan"), float("inf")


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


@st.composite
def episodes(draw, holes=False):
    """rewards, values (B, T) float64 and mask (B, T) bool: rows end at different lengths (some empty).

    With ``holes`` the mask is arbitrary (a 0 inside a row is an episode boundary).
    """
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    rewards = f64(draw(st.lists(st.floats(-5, 5), min_size=b * t, max_size=b * t))).reshape(b, t)
    values = f64(draw(st.lists(st.floats(-5, 5), min_size=b * t, max_size=b * t))).reshape(b, t)
    if holes:
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    else:
        lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
        mask = torch.arange(t) < lengths.unsqueeze(1)
    return rewards, values, mask


discounts = st.tuples(st.floats(0, 1), st.floats(0, 1))


def loop_gae(rewards, values, mask, gamma, lam):
    """A_t = sum_{k=t}^{end-1} (gamma lam)^(k-t) delta_k over the run of real tokens containing t, with
    delta_k = r_k + gamma V_{k+1} - V_k and V_end = 0 (the definition, not the recursion)."""
    b, t_len = rewards.shape
    adv = [[0.0] * t_len for _ in range(b)]
    ret = [[0.0] * t_len for _ in range(b)]
    for i in range(b):
        for t in range(t_len):
            if not mask[i, t]:
                continue
            end = t
            while end < t_len and mask[i, end]:
                end += 1
            total = 0.0
            for k in range(t, end):
                next_value = values[i, k + 1].item() if k + 1 < end else 0.0
                delta = rewards[i, k].item() + gamma * next_value - values[i, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[i][t] = total
            ret[i][t] = total + values[i, t].item()
    return f64(adv), f64(ret)


def with_garbage(x, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(len(GARBAGE), x.shape, generator=gen)]
    return torch.where(mask, x, junk)


# (a) Numbers worked by hand ----------------------------------------------------------------------------


def test_gamma_1_lam_1_is_reward_to_go_minus_value():
    # rewards [0, 0, 1] -> reward-to-go [1, 1, 1]; values [0.5, 0.6, 0.7] -> A = [0.5, 0.4, 0.3]
    # via the recursion: delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3];
    # A_2 = 0.3, A_1 = 0.1 + 0.3 = 0.4, A_0 = 0.1 + 0.4 = 0.5 ; returns = A + V = [1, 1, 1]
    adv, ret = gae_advantages(f64([[0.0, 0.0, 1.0]]), f64([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(adv, f64([[0.5, 0.4, 0.3]]))
    torch.testing.assert_close(ret, f64([[1.0, 1.0, 1.0]]))


REWARDS_3 = [1.0, 0.0, 2.0]
VALUES_3 = [1.0, 2.0, 3.0]
# gamma 0.9, lam 0.5 (gamma * lam = 0.45):
# delta_2 = 2 + 0.9 * 0 - 3 = -1 ; delta_1 = 0 + 0.9 * 3 - 2 = 0.7 ; delta_0 = 1 + 0.9 * 2 - 1 = 1.8
# A_2 = -1 ; A_1 = 0.7 + 0.45 * -1 = 0.25 ; A_0 = 1.8 + 0.45 * 0.25 = 1.9125
# returns = A + V = [2.9125, 2.25, 2.0]
ADV_3 = [1.9125, 0.25, -1.0]
RET_3 = [2.9125, 2.25, 2.0]


def test_gamma_09_lam_05_by_hand():
    adv, ret = gae_advantages(f64([REWARDS_3]), f64([VALUES_3]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, f64([ADV_3]))
    torch.testing.assert_close(ret, f64([RET_3]))


def test_early_end_with_garbage_equals_truncated_row():
    # The same 3-token response padded to 5 with NaN/inf: identical numbers, zeros after the end.
    rewards = f64([REWARDS_3 + [NAN, INF], [0.0, 0.0, 0.0, 0.0, 1.0]])
    values = f64([VALUES_3 + [NAN, -INF], [0.1, 0.2, 0.3, 0.4, 0.5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    alone_adv, alone_ret = gae_advantages(f64([REWARDS_3]), f64([VALUES_3]), torch.ones(1, 3), 0.9, 0.5)
    assert torch.equal(adv[0, :3], alone_adv[0]) and torch.equal(ret[0, :3], alone_ret[0])
    assert (adv[0, 3:] == 0).all() and (ret[0, 3:] == 0).all()
    torch.testing.assert_close(adv[0, :3], f64(ADV_3))


def test_lam_0_is_one_step_td_error():
    # lam = 0: A_t = delta_t = [1.8, 0.7, -1] for the gamma 0.9 example above
    adv, _ = gae_advantages(f64([REWARDS_3]), f64([VALUES_3]), torch.ones(1, 3), gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, f64([[1.8, 0.7, -1.0]]))


def test_whiten_by_hand():
    # kept advantages 1, 2, 3 (mean 2, unbiased var 1) -> -1, 0, 1 ; masked stays 0
    adv = f64([[1.0, 2.0], [3.0, NAN]])
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(whiten_advantages(adv, mask, eps=0.0), f64([[-1.0, 0.0], [1.0, 0.0]]))
    # shift_mean=False adds the mean 2 back on real tokens
    torch.testing.assert_close(whiten_advantages(adv, mask, False, eps=0.0), f64([[1.0, 2.0], [3.0, 0.0]]))


def test_empty_and_zero_length():
    adv, ret = gae_advantages(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0))
    assert adv.shape == ret.shape == (2, 0)
    adv, ret = gae_advantages(f64([[NAN, NAN]]), f64([[NAN, 1.0]]), torch.zeros(1, 2))
    assert adv.tolist() == [[0.0, 0.0]] and ret.tolist() == [[0.0, 0.0]]


def test_errors():
    ones = torch.ones(1, 3)
    with pytest.raises(ValueError):
        gae_advantages(ones, ones[:, :2], ones)
    with pytest.raises(ValueError):
        gae_advantages(ones, ones, ones, gamma=1.5)
    with pytest.raises(ValueError):
        gae_advantages(ones, ones, ones, lam=-0.1)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(st.one_of(episodes(), episodes(holes=True)), discounts)
def test_matches_loop(episode, gamma_lam):
    rewards, values, mask = episode
    adv, ret = gae_advantages(rewards, values, mask, *gamma_lam)
    ref_adv, ref_ret = loop_gae(rewards, values, mask, *gamma_lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(episodes(), episodes(holes=True)), discounts, st.integers(0, 1000))
def test_garbage_after_the_end_changes_nothing(episode, gamma_lam, seed):
    rewards, values, mask = episode
    adv, ret = gae_advantages(rewards, values, mask, *gamma_lam)
    dirty = gae_advantages(
        with_garbage(rewards, mask, seed), with_garbage(values, mask, seed + 1), mask, *gamma_lam
    )
    assert torch.equal(adv, dirty[0]) and torch.equal(ret, dirty[1])
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@SETTINGS
@given(episodes())
def test_gamma_1_lam_1_returns_are_reward_to_go_whatever_the_values(episode):
    rewards, values, mask = episode
    _, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    clean = torch.where(mask, rewards, 0.0)
    reward_to_go = clean.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, torch.where(mask, reward_to_go, 0.0))


@SETTINGS
@given(episodes(), episodes(), discounts)
def test_rows_are_independent(first, second, gamma_lam):
    # Splitting the batch in two and concatenating the results gives the full-batch result.
    t = min(first[0].shape[1], second[0].shape[1])
    halves = [tuple(x[:, :t] for x in ep) for ep in (first, second)]
    full = gae_advantages(*(torch.cat(parts) for parts in zip(*halves)), *gamma_lam)
    parts = [gae_advantages(*half, *gamma_lam) for half in halves]
    assert torch.equal(full[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(full[1], torch.cat([p[1] for p in parts]))


@SETTINGS
@given(episodes(holes=True), st.booleans())
def test_whiten_is_masked_whiten_with_unit_statistics(episode, shift_mean):
    adv, _, mask = episode
    whitened = whiten_advantages(adv, mask, shift_mean)
    assert torch.equal(whitened, masked_whiten(adv, mask, shift_mean))
    var = masked_var(adv, mask).item()
    if shift_mean and mask.sum() >= 2 and var > 1e-3:
        assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-9)
        # eps = 1e-8 sits inside the square root: the variance is var / (var + eps), not exactly 1
        # (hypothesis found var = 0.0078, where that is 1 - 1.3e-6).
        assert masked_var(whitened, mask).item() == pytest.approx(var / (var + 1e-8), rel=1e-9)
