"""Tests for rlhfkit.core.kl_controller: hand-worked numbers, a naive loop reference, and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.kl_controller import KLController

SETTINGS = settings(max_examples=50, deadline=None)

steps = st.lists(st.tuples(st.floats(0, 50), st.integers(0, 5000)), max_size=20)


def loop_adaptive(init, target, horizon, updates):
    """beta_T = beta_0 * prod_t (1 + clip(KL_t / target - 1, -0.2, 0.2) * n_t / horizon)."""
    value = init
    for kl, n in updates:
        error = kl / target - 1
        error = max(min(error, 0.2), -0.2)
        value = value * (1 + error * n / horizon)
    return value


# (a) Numbers worked by hand ----------------------------------------------------------------------------


def test_adaptive_sequence_by_hand():
    ctl = KLController(kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to 0.2 ; n/h = 0.1 -> x (1 + 0.02) -> 0.102
    ctl.update(9.0, 1000)
    assert ctl.value == pytest.approx(0.102)
    # KL 6.6: error 0.1 -> x 1.01 -> 0.10302
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.10302)
    # KL 0: error -1, clipped to -0.2 ; n/h = 0.05 -> x 0.99 -> 0.1019898
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(0.1019898)
    # KL 5.4: error -0.1 ; n/h = 0.2 -> x 0.98 -> 0.099950004
    ctl.update(5.4, 2000)
    assert ctl.value == pytest.approx(0.099950004)
    # on target: error 0 -> unchanged
    ctl.update(6.0, 2000)
    assert ctl.value == pytest.approx(0.099950004)


def test_error_is_clipped_at_plus_minus_02():
    # Any KL above 1.2 * target moves beta like 1.2 * target does; any below 0.8 * target like 0.8 * target.
    for kl in (7.2, 10.0, 1e6):
        ctl = KLController(1.0, 6.0, 100)
        ctl.update(kl, 10)  # x (1 + 0.2 * 0.1)
        assert ctl.value == pytest.approx(1.02)
    for kl in (4.8, 1.0, 0.0):
        ctl = KLController(1.0, 6.0, 100)
        ctl.update(kl, 10)  # x (1 - 0.2 * 0.1)
        assert ctl.value == pytest.approx(0.98)


def test_tensor_kl_is_accepted():
    ctl = KLController(0.1, 6.0, 10_000)
    ctl.update(torch.tensor(9.0), 1000)
    assert isinstance(ctl.value, float) and ctl.value == pytest.approx(0.102)


def test_fixed_never_moves():
    ctl = KLController(0.05)
    for kl in (0.0, 100.0, 3.0):
        ctl.update(kl, 1000)
    assert ctl.value == 0.05


def test_state_round_trip():
    ctl = KLController(0.2, 4.0, 1000)
    for kl, n in [(9.0, 64), (1.0, 64), (4.4, 32)]:
        ctl.update(kl, n)
    state = ctl.state_dict()
    assert state == {"value": ctl.value} and all(type(v) is float for v in state.values())
    resumed = KLController(0.2, 4.0, 1000)
    resumed.load_state_dict(state)
    for kl, n in [(7.0, 64), (2.0, 64)]:
        ctl.update(kl, n)
        resumed.update(kl, n)
    assert resumed.value == ctl.value  # bit-for-bit: same floats, same operations

    fixed = KLController(0.3)
    other = KLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3 and type(fixed.state_dict()["value"]) is float


def test_settings_are_kept_and_a_target_makes_it_adaptive():
    fixed = KLController(0.05)
    assert (fixed.value, fixed.target) == (0.05, None)
    adaptive = KLController(0.1, target=6.0, horizon=10_000)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10_000.0)


def test_errors():
    with pytest.raises(ValueError, match="target"):
        KLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="horizon"):
        KLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match=">= 0"):
        KLController(-0.1)
    with pytest.raises(ValueError, match="n_steps"):
        KLController(0.1, 1.0, 100).update(1.0, -1)
    with pytest.raises(ValueError, match=">= 0"):
        KLController(0.1).load_state_dict({"value": -1.0})


# (b) Against the naive loop reference -------------------------------------------------------------------


@SETTINGS
@given(st.floats(0, 1), st.floats(0.5, 20), st.floats(5000, 1e5), steps)
def test_adaptive_matches_loop(init, target, horizon, updates):
    ctl = KLController(init, target, horizon)
    for kl, n in updates:
        ctl.update(kl, n)
    assert ctl.value == pytest.approx(loop_adaptive(init, target, horizon, updates), rel=1e-12, abs=1e-300)


# (c) Properties -----------------------------------------------------------------------------------------


@SETTINGS
@given(st.floats(0.01, 1), st.floats(0.5, 20), st.floats(0, 50), st.integers(1, 5000))
def test_beta_moves_towards_the_target(init, target, kl, n):
    # Too much KL -> stronger penalty; too little -> weaker; on target -> unchanged. Never below 0
    # (with n <= horizon the multiplier is at least 1 - 0.2).
    ctl = KLController(init, target, horizon=10_000)
    ctl.update(kl, n)
    if kl > target:
        assert ctl.value > init
    elif kl < target:
        assert ctl.value < init
    assert init * 0.8 <= ctl.value <= init * 1.2


@SETTINGS
@given(st.floats(0, 1), steps, st.integers(0, 20))
def test_resume_anywhere_gives_the_same_value(init, updates, cut):
    # Checkpoint after `cut` updates, resume in a fresh controller: the final value is identical.
    straight = KLController(init, 6.0, 10_000)
    for kl, n in updates:
        straight.update(kl, n)
    first = KLController(init, 6.0, 10_000)
    for kl, n in updates[:cut]:
        first.update(kl, n)
    resumed = KLController(123.0, 6.0, 10_000)
    resumed.load_state_dict(first.state_dict())
    for kl, n in updates[cut:]:
        resumed.update(kl, n)
    assert resumed.value == straight.value
