"""Best-of-n sampling as a baseline for RL fine-tuning (Nakano et al. 2021; Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization"): draw n responses from the reference, keep the one the reward model scores
highest. Its KL to the reference has a closed form, so each n is a point on the same (KL, gold) plane as the
trained policies, and one sees whether RL beat a policy that needs no training at the same KL.
"""

from __future__ import annotations

import math

import torch


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || reference) = log n - (n - 1) / n nats (Stiennon et al. 2020, appendix; Gao et al. 2022,
    eq. 2): exact when the reward model's scores have no ties. n = 1 gives 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_sizes(n_max: int) -> list[int]:
    """The n reported up to `n_max`: the powers of two below it, and n_max itself (16 -> 1, 2, 4, 8, 16)."""
    sizes, n = [], 1
    while n < n_max:
        sizes.append(n)
        n *= 2
    return sizes + [n_max]


def best_of_n_pick(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each prompt, among its first n samples, the one with the highest proxy (reward-model) score; ties go
    to the earliest. proxy, gold: (P, N) with N >= n, sample j of prompt i at [i, j]. Returns the chosen
    samples' gold scores and proxy scores, each (P,).

    The first n of N independent samples are themselves n independent samples, so one draw of N per prompt
    serves every n <= N (the curve's points share samples, as in Gao et al.'s estimator)."""
    if proxy.shape != gold.shape or proxy.dim() != 2:
        raise ValueError(f"proxy and gold must both be (P, N), got {tuple(proxy.shape)} and {tuple(gold.shape)}")
    if not 1 <= n <= proxy.shape[1]:
        raise ValueError(f"n must be in [1, {proxy.shape[1]}], got {n}")
    # argmax returns the first maximal index on ties.
    chosen = proxy[:, :n].argmax(dim=1, keepdim=True)  # (P, 1)
    return gold.gather(1, chosen).squeeze(1), proxy.gather(1, chosen).squeeze(1)
