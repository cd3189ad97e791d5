"""The reward function both GRPO trainers get in bench/dpo_grpo.py: cheap, deterministic, pure Python.

TRL's convention, which rlhfkit's `--reward-function module:function` follows too:
`fn(prompts, completions, **kwargs) -> list[float]`, where a completion is text, or for a conversational
prompt a list with one assistant message.
"""

from __future__ import annotations

_analyzer = None


def _text(completion) -> str:
    if isinstance(completion, list):  # [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def vader_compound(prompts, completions, **kwargs) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (the gold score rlhfkit's pipeline uses)."""
    global _analyzer
    if _analyzer is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _analyzer = SentimentIntensityAnalyzer()
    return [float(_analyzer.polarity_scores(_text(c))["compound"]) for c in completions]
