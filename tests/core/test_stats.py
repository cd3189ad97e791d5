import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.core.stats import Z95, mean_ci95, win_rate


def test_mean_ci95_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sample variance ((1.5^2 + 0.5^2) * 2) / 3 = 5/3, s = 1.2910
    out = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2
    assert out["mean"] == 2.5 and out["n"] == 4
    assert math.isclose(out["ci95"][0], 2.5 - half) and math.isclose(out["ci95"][1], 2.5 + half)


def test_mean_ci95_edge_cases():
    assert mean_ci95(torch.tensor([3.0]))["ci95"] == [3.0, 3.0]
    assert math.isnan(mean_ci95(torch.tensor([]))["mean"])


def loop_ci(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean - Z95 * math.sqrt(var / n), mean + Z95 * math.sqrt(var / n)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=50))
def test_mean_ci95_matches_a_loop_and_contains_the_mean(values):
    out = mean_ci95(torch.tensor(values, dtype=torch.float64))
    lo, hi = loop_ci(values)
    assert math.isclose(out["ci95"][0], lo, abs_tol=1e-9) and math.isclose(out["ci95"][1], hi, abs_tol=1e-9)
    assert out["ci95"][0] <= out["mean"] + 1e-12 <= out["ci95"][1] + 2e-12


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])).tolist() == [1.0, 0.0, 0.5]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=30))
def test_win_rates_of_both_sides_add_to_one(pairs):
    a = torch.tensor([float(p[0]) for p in pairs])
    b = torch.tensor([float(p[1]) for p in pairs])
    assert torch.allclose(win_rate(a, b) + win_rate(b, a), torch.ones(len(pairs), dtype=torch.float64))
