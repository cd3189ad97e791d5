"""Gold scorers: the hidden "true" preference a simulated annotator follows.

A scorer takes lists of prompts and responses and returns one float per pair. The default is VADER's
compound sentiment of the response, in [-1, 1] (Hutto & Gilbert 2014). Any Python callable with that
signature can stand in, named as `module:function`. The reward model never sees these scores: they only
label pairs and evaluate, which is what lets us measure reward over-optimisation.
"""

from __future__ import annotations

from typing import Callable

from rlhfkit.errors import UserError
from rlhfkit.rollout.reward_functions import import_function

GoldScorer = Callable[[list[str], list[str]], list[float]]


def vader_scorer() -> GoldScorer:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(analyzer.polarity_scores(text)["compound"]) for text in responses]

    return score


def load_gold_scorer(spec: str) -> GoldScorer:
    """'vader', or 'package.module:function' importable from the current environment."""
    if spec == "vader":
        return vader_scorer()
    if ":" not in spec:
        raise UserError(f"gold scorer '{spec}': expected 'vader' or 'module:function'")
    func = import_function(spec, "gold scorer")

    def checked(prompts: list[str], responses: list[str]) -> list[float]:
        scores = list(func(prompts, responses))
        if len(scores) != len(responses):
            raise UserError(f"gold scorer '{spec}' returned {len(scores)} scores for {len(responses)} responses")
        return [float(s) for s in scores]

    return checked
