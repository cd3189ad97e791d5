"""Turning gold scores into noisy rankings and preference pairs, like a (fallible) person would.

Noise model: a ranking is drawn from the Plackett-Luce distribution with weights exp(g_i / T): the best is
picked with probability softmax(g / T), then the best of the rest, and so on. For two responses this is
exactly Bradley-Terry, P(a over b) = sigmoid((g_a - g_b) / T); T = 0 ranks by gold score deterministically.
"""

from __future__ import annotations

import math
import random


def noisy_ranking(gold: list[float], temperature: float, rng: random.Random) -> list[int]:
    """Indices of `gold`, best first, drawn from Plackett-Luce(exp(gold / temperature))."""
    if temperature <= 0:
        return sorted(range(len(gold)), key=lambda i: (-gold[i], i))
    remaining, ranking = list(range(len(gold))), []
    while remaining:
        top = max(gold[i] for i in remaining)
        weights = [math.exp((gold[i] - top) / temperature) for i in remaining]
        pick = rng.choices(remaining, weights=weights)[0]
        ranking.append(pick)
        remaining.remove(pick)
    return ranking


def ranking_pairs(responses: list[str], ranking: list[int], gold: list[float], drop_ties: bool) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs: every earlier-ranked response over every later one, leaving out pairs
    with identical text (nothing to prefer) and, with `drop_ties`, pairs of equal gold score."""
    pairs = []
    for i, better in enumerate(ranking):
        for worse in ranking[i + 1:]:
            if responses[better] == responses[worse]:
                continue
            if drop_ties and gold[better] == gold[worse]:
                continue
            pairs.append((better, worse))
    return pairs
