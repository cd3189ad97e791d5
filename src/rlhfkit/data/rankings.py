"""Turn ranking records into preference pairs.

A ranking ``[best, ..., worst]`` over ``k`` ranked responses implies ``k(k-1)/2`` ordered pairs: each
response beats every response ranked below it. Responses left out of the ranking yield no pairs.
"""

from __future__ import annotations


def ranking_to_pairs(record: dict) -> list[dict]:
    """All pairs ``{"prompt", "chosen", "rejected"}`` implied by one (validated) ranking record.

    Order: for i over ranking positions best first, for j > i: chosen = responses[ranking[i]],
    rejected = responses[ranking[j]]. So the first k-1 pairs are the best response against all others.
    """
    prompt, responses, ranking = record["prompt"], record["responses"], record["ranking"]
    return [{"prompt": prompt, "chosen": responses[better], "rejected": responses[worse]}
            for i, better in enumerate(ranking) for worse in ranking[i + 1:]]


def rankings_to_preferences(records) -> list[dict]:
    """`ranking_to_pairs` over many records, concatenated in record order."""
    return [pair for record in records for pair in ranking_to_pairs(record)]
