"""How much annotators agree, when items were ranked by more than one (overlap > 1). Pure functions.

Ranks are 1 = best with ties as equal numbers; before any statistic they become mid-ranks (a tie of the 1st
and 2nd place is 1.5 each), the usual treatment of ties in Kendall's W and in rank correlations.

- pairwise agreement: over every item, every two annotators who ranked it and every two of its responses,
  the share where both gave the same answer (a over b, b over a, or a tie). `strict` counts only the
  comparisons where both preferred one response, and asks whether they preferred the same one.
- Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"): units are
  (item, response), coders the annotators, values the mid-ranks; 1 = perfect agreement, 0 = chance.
  The ordinal metric fits ranks; interval and nominal are there for comparison and for the tests.
- Kendall's W (coefficient of concordance, with the correction for ties) of each item ranked by m >= 2
  annotators, then its mean over those items.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations


def mid_ranks(ranks: list[int]) -> list[float]:
    """Mid-ranks of a ranking with ties: [1, 1, 3] -> [1.5, 1.5, 3.0]; [1, 1, 2] -> the same."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    out = [0.0] * len(ranks)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and ranks[order[end + 1]] == ranks[order[start]]:
            end += 1
        for position in range(start, end + 1):
            out[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return out


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(items: list[dict[str, list[int]]]) -> dict:
    """`items`: per item, annotator -> ranks. Agreement over all annotator pairs and response pairs, overall,
    on strict preferences only, and per annotator (with every other annotator on the same items)."""
    same = total = strict_same = strict_total = 0
    per: dict[str, list[int]] = {}
    for by_annotator in items:
        for (a, ra), (b, rb) in combinations(sorted(by_annotator.items()), 2):
            for i, j in combinations(range(len(ra)), 2):
                sa, sb = _sign(ra[j] - ra[i]), _sign(rb[j] - rb[i])
                agree = int(sa == sb)
                same, total = same + agree, total + 1
                for name in (a, b):
                    counts = per.setdefault(name, [0, 0])
                    counts[0] += agree
                    counts[1] += 1
                if sa and sb:
                    strict_same, strict_total = strict_same + agree, strict_total + 1
    return {"agreement": same / total if total else None, "comparisons": total,
            "strict_agreement": strict_same / strict_total if strict_total else None,
            "strict_comparisons": strict_total,
            "per_annotator": {name: {"agreement": s / n, "comparisons": n} for name, (s, n) in sorted(per.items())}}


def _delta2(metric: str, c: float, k: float, n_values: dict[float, float]) -> float:
    if metric == "nominal":
        return 0.0 if c == k else 1.0
    if metric == "interval":
        return (c - k) ** 2
    if metric == "ordinal":
        low, high = min(c, k), max(c, k)
        between = sum(n for value, n in n_values.items() if low <= value <= high)
        return (between - (n_values[c] + n_values[k]) / 2) ** 2
    raise ValueError(f"unknown metric {metric!r}")


def krippendorff_alpha(units: list[list[float]], metric: str = "ordinal") -> float | None:
    """Krippendorff's alpha of `units`, each the values its coders gave (missing values left out). Units with
    fewer than 2 values are not pairable and count for nothing. None when undefined (no pairable unit, or
    every pairable value the same, so no disagreement is expected)."""
    coincidences: Counter = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidences[c, k] += 1 / (m - 1)
    n_values: dict[float, float] = {}
    for (c, _), o in coincidences.items():
        n_values[c] = n_values.get(c, 0.0) + o
    n = sum(n_values.values())
    if n <= 1:
        return None
    observed = sum(o * _delta2(metric, c, k, n_values) for (c, k), o in coincidences.items())
    expected = sum(n_values[c] * n_values[k] * _delta2(metric, c, k, n_values)
                   for c in n_values for k in n_values)
    if expected == 0:
        return None
    return 1 - (n - 1) * observed / expected


def kendall_w(rankings: list[list[int]]) -> float | None:
    """Kendall's W of m rankings of the same n objects (1 = best, ties allowed, corrected for). None for
    m < 2 or n < 2, or when every ranking is one big tie."""
    m = len(rankings)
    n = len(rankings[0]) if rankings else 0
    if m < 2 or n < 2:
        return None
    mids = [mid_ranks(r) for r in rankings]
    sums = [sum(r[i] for r in mids) for i in range(n)]
    mean = m * (n + 1) / 2
    s = sum((x - mean) ** 2 for x in sums)
    ties = sum(t ** 3 - t for r in rankings for t in Counter(r).values())
    denominator = m * m * (n ** 3 - n) - m * ties
    return None if denominator <= 0 else 12 * s / denominator


def agreement_report(items: list[dict[str, list[int]]]) -> dict:
    """Everything of agreement.json from per-item rankings (annotator -> ranks); items ranked by one
    annotator only count in `items_ranked`."""
    shared = [by for by in items if len(by) >= 2]
    units = [[mid_ranks(ranks)[i] for ranks in by.values()] for by in shared for i in range(len(next(iter(by.values()))))]
    ws = [w for by in shared if (w := kendall_w(list(by.values()))) is not None]
    pairwise = pairwise_agreement(shared)
    return {
        "items_ranked": len(items),
        "items_ranked_by_several": len(shared),
        "pairwise_agreement": pairwise["agreement"],
        "pairwise_comparisons": pairwise["comparisons"],
        "pairwise_agreement_strict": pairwise["strict_agreement"],
        "pairwise_comparisons_strict": pairwise["strict_comparisons"],
        "krippendorff_alpha_ordinal": krippendorff_alpha(units, "ordinal"),
        "krippendorff_alpha_interval": krippendorff_alpha(units, "interval"),
        "kendall_w_mean": sum(ws) / len(ws) if ws else None,
        "kendall_w_items": len(ws),
        "per_annotator": pairwise["per_annotator"],
    }
