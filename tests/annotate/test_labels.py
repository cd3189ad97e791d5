import math
import random

import pytest

from rlhfkit.eval.gold import load_gold_scorer, vader_scorer
from rlhfkit.annotate.labels import noisy_ranking, ranking_pairs
from rlhfkit.errors import UserError


def test_zero_temperature_ranks_by_gold_with_stable_ties():
    assert noisy_ranking([0.1, 0.9, 0.5, 0.9], 0.0, random.Random(0)) == [1, 3, 2, 0]


@pytest.mark.parametrize("diff,temperature", [(0.2, 0.1), (0.5, 0.5), (1.0, 0.25)])
def test_two_responses_follow_bradley_terry(diff, temperature):
    """P(a ranked over b) = sigmoid((g_a - g_b) / T): check the frequency over many draws."""
    rng = random.Random(1)
    n = 20000
    wins = sum(noisy_ranking([diff, 0.0], temperature, rng)[0] == 0 for _ in range(n))
    expected = 1 / (1 + math.exp(-diff / temperature))
    assert abs(wins / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_ranking_pairs_all_ordered_pairs_without_ties_or_duplicates():
    responses = ["a", "b", "c", "d"]
    assert ranking_pairs(responses, [2, 0, 1, 3], [0.5, 0.2, 0.9, 0.0], drop_ties=True) == [
        (2, 0), (2, 1), (2, 3), (0, 1), (0, 3), (1, 3)]
    # Equal gold scores: no preference to learn; identical texts: nothing to prefer.
    assert ranking_pairs(["x", "y", "x"], [0, 1, 2], [0.3, 0.3, 0.1], drop_ties=True) == [(1, 2)]
    assert ranking_pairs(["x", "y", "z"], [0, 1, 2], [0.3, 0.3, 0.1], drop_ties=False) == [(0, 1), (0, 2), (1, 2)]


def test_vader_scores_sentiment():
    scores = vader_scorer()(["", "", ""], ["I love this, it is wonderful!", "The table is brown.", "I hate this awful thing."])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5


def test_custom_gold_scorer_by_name_and_its_errors():
    score = load_gold_scorer("tests.trainers.gold_rule:score")
    assert score(["p", "p"], ["excellent", "terrible"]) == [1.0, -1.0]
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        load_gold_scorer("no_such_module:f")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_gold_scorer("tests.trainers.gold_rule:nope")
    with pytest.raises(UserError, match="expected 'vader' or 'module:function'"):
        load_gold_scorer("sentiment")
