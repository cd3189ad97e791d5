"""Best-of-n: the closed-form KL, which n are reported, and the pick (by hand, a naive loop, properties)."""

import math

import pytest
import torch

from rlhfkit.core.best_of_n import best_of_n_kl, best_of_n_pick, best_of_n_sizes


def test_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(16) == pytest.approx(2.772588722 - 0.9375)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_matches_the_exact_kl_of_best_of_n_over_many_outcomes(n):
    """Reference: uniform over M outcomes with distinct rewards. Best-of-n picks the outcome of rank k (1 = lowest)
    with probability (k/M)^n - ((k-1)/M)^n; its KL to the uniform tends to log n - (n-1)/n as M grows."""
    M = 200_000
    k = torch.arange(1, M + 1, dtype=torch.float64)
    p = (k / M) ** n - ((k - 1) / M) ** n
    exact = float((p * torch.log(p * M)).sum())
    assert exact == pytest.approx(best_of_n_kl(n), abs=1e-3)


def test_sizes():
    assert best_of_n_sizes(16) == [1, 2, 4, 8, 16]
    assert best_of_n_sizes(1) == [1]
    assert best_of_n_sizes(6) == [1, 2, 4, 6]


def test_pick_by_hand_and_ties_go_to_the_earliest():
    proxy = torch.tensor([[0.1, 0.9, 0.5, 2.0],
                          [1.0, 1.0, 0.0, 0.0]])
    gold = torch.tensor([[10.0, 20.0, 30.0, 40.0],
                         [1.0, 2.0, 3.0, 4.0]])
    g, p = best_of_n_pick(proxy, gold, 1)
    assert g.tolist() == [10.0, 1.0] and p.tolist() == pytest.approx([0.1, 1.0])
    g, p = best_of_n_pick(proxy, gold, 3)
    assert g.tolist() == [20.0, 1.0]  # row 2: a tie between samples 0 and 1, the earliest wins
    g, _ = best_of_n_pick(proxy, gold, 4)
    assert g.tolist() == [40.0, 1.0]


def test_pick_against_a_naive_loop_and_its_properties():
    generator = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(50, 16, generator=generator), torch.randn(50, 16, generator=generator)
    previous = None
    for n in best_of_n_sizes(16):
        g, p = best_of_n_pick(proxy, gold, n)
        for i in range(50):
            j = max(range(n), key=lambda col: (proxy[i, col].item(), -col))
            assert g[i] == gold[i, j] and p[i] == proxy[i, j]
        if previous is not None:
            assert bool((p >= previous).all())  # more samples never lower the chosen proxy score
        previous = p
    with pytest.raises(ValueError):
        best_of_n_pick(proxy, gold, 17)
    with pytest.raises(ValueError):
        best_of_n_pick(proxy, gold[:, :8], 4)
