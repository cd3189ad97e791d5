"""Tests for rlhfkit.core.reward_shaping: hand-worked numbers, a naive loop reference, and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.reward_shaping import shape_rewards

SETTINGS = settings(max_examples=50, deadline=None)
GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30]
NAN = float("nan")


@st.composite
def rollouts(draw, holes=False):
    """scores (B,), kl (B, T), mask (B, T), ended (B,); rows end at different lengths (some empty).

    With ``holes`` the mask is arbitrary rather than a prefix of ones.
    """
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    scores = torch.tensor(draw(st.lists(st.floats(-10, 10), min_size=b, max_size=b)), dtype=torch.float64)
    kl = torch.tensor(draw(st.lists(st.floats(-3, 3), min_size=b * t, max_size=b * t)), dtype=torch.float64)
    if holes:
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    else:
        lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
        mask = torch.arange(t) < lengths.unsqueeze(1)
    ended = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    return scores, kl.reshape(b, t), mask, ended


options = st.fixed_dictionaries(
    {
        "kl_coef": st.floats(0, 1),
        "missing_eos_penalty": st.one_of(st.none(), st.floats(0, 5)),
        "reward_clip": st.one_of(st.none(), st.floats(0.1, 5)),
        "reward_scale": st.floats(-2, 2),
    }
)


def loop_shape(scores, kl, mask, ended, kl_coef, missing_eos_penalty, reward_clip, reward_scale):
    b, t = kl.shape
    rewards = [[0.0] * t for _ in range(b)]
    kl_sums, non_score_sums, totals = [], [], []
    for i in range(b):
        score = scores[i].item()
        if missing_eos_penalty is not None and not ended[i]:
            score -= missing_eos_penalty
        score *= reward_scale
        if reward_clip is not None:
            score = min(max(score, -reward_clip), reward_clip)
        last = max((j for j in range(t) if mask[i, j]), default=None)
        kl_sum = non_score_sum = 0.0
        for j in range(t):
            if mask[i, j]:
                rewards[i][j] = -kl_coef * kl[i, j].item()
                kl_sum += kl[i, j].item()
                non_score_sum += rewards[i][j]
        if last is not None:
            rewards[i][last] += score
        kl_sums.append(kl_sum)
        non_score_sums.append(non_score_sum)
        totals.append(sum(rewards[i]))
    metrics = {
        "objective/kl": sum(kl_sums) / b,
        "objective/scores": scores.mean().item(),
        "objective/non_score_reward": sum(non_score_sums) / b,
        "objective/rlhf_reward": sum(totals) / b,
    }
    return torch.tensor(rewards, dtype=torch.float64), metrics


def with_garbage(x, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(len(GARBAGE), x.shape, generator=gen)]
    return torch.where(mask, x, junk)


# (a) Numbers worked by hand ----------------------------------------------------------------------------

SCORES = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
KL = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, NAN], [1.0, NAN, NAN]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])


def test_by_hand_variable_lengths():
    # kl_coef 0.5 -> non-score rewards: row 0 [-0.05, -0.1, -0.15], row 1 [-0.2, -0.25, 0], row 2 [-0.5, 0, 0]
    # scores land on the last real token: row 0 at t=2, row 1 at t=1, row 2 at t=0
    rewards, metrics = shape_rewards(SCORES, KL, MASK, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [2.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rewards, expected)
    # kl row sums 0.6, 0.9, 1.0 -> mean 2.5/3 ; non-score row sums -0.3, -0.45, -0.5 -> mean -1.25/3
    # rlhf reward rows 0.7, 1.55, 2.5 -> mean 4.75/3 ; raw scores mean 2
    assert metrics["objective/kl"].item() == pytest.approx(2.5 / 3)
    assert metrics["objective/non_score_reward"].item() == pytest.approx(-1.25 / 3)
    assert metrics["objective/rlhf_reward"].item() == pytest.approx(4.75 / 3)
    assert metrics["objective/scores"].item() == pytest.approx(2.0)


def test_missing_eos_penalty_then_scale_then_clip():
    ended = torch.tensor([True, False, False])
    zero_kl = torch.zeros(3, 3, dtype=torch.float64)
    # penalty 1 on the unfinished rows: [1, 2, 3] -> [1, 1, 2]
    rewards, metrics = shape_rewards(SCORES, zero_kl, MASK, 0.1, ended=ended, missing_eos_penalty=1.0)
    torch.testing.assert_close(
        rewards[[0, 1, 2], [2, 1, 0]], torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    )
    assert metrics["objective/scores"].item() == pytest.approx(2.0)  # raw, before the penalty
    # then scale 2 -> [2, 2, 4], then clip 3 -> [2, 2, 3]
    rewards, _ = shape_rewards(
        SCORES, zero_kl, MASK, 0.1, ended=ended, missing_eos_penalty=1.0, reward_scale=2.0, reward_clip=3.0
    )
    torch.testing.assert_close(
        rewards[[0, 1, 2], [2, 1, 0]], torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64)
    )
    # clipping is symmetric: -10 * 1 -> clipped to -3
    rewards, _ = shape_rewards(-10 * SCORES[:1], zero_kl[:1], MASK[:1], 0.1, reward_clip=3.0)
    assert rewards[0, 2].item() == -3.0


def test_score_on_last_real_token_with_holes():
    # mask 1 0 1 0: the score goes on t=2 (the last 1), not before the first 0
    rewards, _ = shape_rewards(torch.tensor([5.0]), torch.zeros(1, 4), torch.tensor([[1, 0, 1, 0]]), 0.1)
    assert rewards.tolist() == [[0.0, 0.0, 5.0, 0.0]]


def test_empty_row_gets_nothing():
    rewards, metrics = shape_rewards(
        torch.tensor([7.0, 1.0]), torch.ones(2, 2), torch.tensor([[0, 0], [1, 0]]), 0.5
    )
    # row 0 empty -> all 0 ; row 1: -0.5 + 1 = 0.5 ; rlhf_reward mean (0 + 0.5) / 2
    assert rewards.tolist() == [[0.0, 0.0], [0.5, 0.0]]
    assert metrics["objective/rlhf_reward"].item() == pytest.approx(0.25)


def test_tensor_kl_coef_and_metrics_are_detached_scalars():
    kl = KL.clone().requires_grad_(True)
    _, metrics = shape_rewards(SCORES, kl, MASK, torch.tensor(0.5, dtype=torch.float64))
    assert set(metrics) == {
        "objective/kl",
        "objective/scores",
        "objective/non_score_reward",
        "objective/rlhf_reward",
    }
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_errors():
    with pytest.raises(ValueError, match="ended"):
        shape_rewards(SCORES, KL, MASK, 0.1, missing_eos_penalty=1.0)
    with pytest.raises(ValueError):
        shape_rewards(SCORES[:2], KL, MASK, 0.1)
    with pytest.raises(ValueError):
        shape_rewards(SCORES, KL, MASK[:, :2], 0.1)
    with pytest.raises(ValueError):
        shape_rewards(SCORES, KL, MASK, 0.1, ended=torch.tensor([True]), missing_eos_penalty=1.0)
    with pytest.raises(ValueError):
        shape_rewards(SCORES, KL, MASK, 0.1, reward_clip=0.0)


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(st.one_of(rollouts(), rollouts(holes=True)), options)
def test_matches_loop(rollout, opts):
    scores, kl, mask, ended = rollout
    rewards, metrics = shape_rewards(scores, kl, mask, ended=ended, **opts)
    ref_rewards, ref_metrics = loop_shape(scores, kl, mask, ended, **opts)
    torch.testing.assert_close(rewards, ref_rewards)
    for name, value in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-9), name


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(rollouts(), rollouts(holes=True)), options, st.integers(0, 1000))
def test_garbage_after_the_end_changes_nothing(rollout, opts, seed):
    scores, kl, mask, ended = rollout
    rewards, metrics = shape_rewards(scores, kl, mask, ended=ended, **opts)
    dirty_rewards, dirty_metrics = shape_rewards(
        scores, with_garbage(kl, mask, seed), mask, ended=ended, **opts
    )
    assert torch.equal(rewards, dirty_rewards)
    for name in metrics:
        assert torch.equal(metrics[name], dirty_metrics[name])
    assert (rewards[~mask] == 0).all()


@SETTINGS
@given(rollouts(), options)
def test_row_sums_are_processed_score_plus_non_score(rollout, opts):
    # Every non-empty row's rewards sum to its processed score plus -kl_coef * (summed kl); i.e. only
    # one token carries the score. Use a zero-kl run to read off the processed score.
    scores, kl, mask, ended = rollout
    rewards, _ = shape_rewards(scores, kl, mask, ended=ended, **opts)
    score_only, _ = shape_rewards(scores, torch.zeros_like(kl), mask, ended=ended, **opts)
    non_score, _ = shape_rewards(torch.zeros_like(scores), kl, mask, **{**opts, "missing_eos_penalty": None})
    torch.testing.assert_close(rewards, score_only + non_score)
    assert ((score_only != 0).sum(dim=1) <= 1).all()


@SETTINGS
@given(rollouts(), rollouts(), options)
def test_rows_are_independent_and_equal_halves_average(first, second, opts):
    # Concatenating two batches: rewards are the concatenation; with equal batch sizes the full-batch
    # metrics are the average of the halves' metrics.
    t = min(first[1].shape[1], second[1].shape[1])
    b = min(first[0].shape[0], second[0].shape[0])
    halves = [(s[:b], k[:b, :t], m[:b, :t], e[:b]) for s, k, m, e in (first, second)]
    full = [torch.cat(parts) for parts in zip(*halves)]
    rewards, metrics = shape_rewards(full[0], full[1], full[2], ended=full[3], **opts)
    outs = [shape_rewards(s, k, m, ended=e, **opts) for s, k, m, e in halves]
    torch.testing.assert_close(rewards, torch.cat([o[0] for o in outs]))
    for name in metrics:
        assert metrics[name].item() == pytest.approx(
            (outs[0][1][name] + outs[1][1][name]).item() / 2, abs=1e-9
        )
