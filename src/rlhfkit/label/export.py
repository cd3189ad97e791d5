"""`rlhfkit label export`: people's labels -> the files the reward model and DPO train on.

Writes into the output folder (each file atomically: a temporary file, then a rename):
- `preferences.jsonl`: `{"prompt", "chosen", "rejected", "weight", "item_id"}`, the preference records that
  `rlhfkit reward --data` and `rlhfkit dpo --data` read. A pair is made for responses a and b of an item when
  more of the annotators who ranked it put a above b than b above a (with overlap 1: when the one ranking
  does); a tie makes no pair, and neither does an even split of votes. `weight` is the share of those
  annotators who preferred the chosen response (1.0 with one annotator). The readers of today ignore
  `weight` and `item_id` (a record's unknown fields are dropped); they are there for analysis and for a
  weighted loss.
- `rankings.jsonl`: one ranking record per item ranked by someone, `{"prompt", "responses", "ranking",
  "ranks", "annotators", "item_id"}`: `ranks` is the consensus (1 = best, equal = tie) by the mean of the
  annotators' mid-ranks, and `ranking` the indices best first with ties broken by index (the ranking record
  of data/formats.py cannot say "tie": train on preferences.jsonl, which leaves ties out).
- `labels.jsonl`: every label as given (ranks, skips, "none is acceptable", comments), with the annotator.
- `agreement.json`: agreement between annotators on items ranked by several (see agreement.py).
Skips and "none is acceptable" make no pair and no ranking.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhfkit.label.agreement import agreement_report, mid_ranks
from rlhfkit.label.report import rankings_by_item
from rlhfkit.label.store import Store


def consensus_ranks(rankings: list[list[int]]) -> list[int]:
    """Competition ranks (1 = best; equal = tie) of the responses by their mean mid-rank over `rankings`."""
    n = len(rankings[0])
    mids = [mid_ranks(r) for r in rankings]
    means = [sum(r[i] for r in mids) / len(mids) for i in range(n)]
    return [1 + sum(other < mean - 1e-12 for other in means) for mean in means]


def majority_pairs(rankings: list[list[int]]) -> list[tuple[int, int, float]]:
    """(chosen, rejected, weight) for every two responses that more annotators ordered one way than the other;
    weight = share of all annotators of the item who put the chosen one above. Order: chosen's consensus
    place first, as ranking_to_pairs orders a ranking's pairs."""
    m, n = len(rankings), len(rankings[0])
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            over = sum(r[i] < r[j] for r in rankings)
            under = sum(r[j] < r[i] for r in rankings)
            if over > under:
                pairs.append((i, j, over / m))
            elif under > over:
                pairs.append((j, i, under / m))
    place = consensus_ranks(rankings)
    return sorted(pairs, key=lambda p: (place[p[0]], p[0], place[p[1]], p[1]))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def export(store: Store, output_dir) -> dict:
    """Write the four files into `output_dir` from one consistent snapshot of the project; return a summary."""
    out = Path(output_dir)
    with store.read() as conn:
        items = store.items(conn)
        labels = store.labels(conn=conn)
    by_item = rankings_by_item(labels)
    rankings, preferences = [], []
    for item in items:
        ranked = by_item.get(item["item_id"])
        if not ranked:
            continue
        prompt, responses = item["prompt"], item["responses"]
        votes = list(ranked.values())
        ranks = consensus_ranks(votes)
        rankings.append({"prompt": prompt, "responses": responses,
                         "ranking": sorted(range(len(responses)), key=lambda i: (ranks[i], i)),
                         "ranks": ranks, "annotators": len(votes), "item_id": item["item_id"]})
        for chosen, rejected, weight in majority_pairs(votes):
            if responses[chosen] == responses[rejected]:
                continue  # the same text twice: nothing to prefer
            preferences.append({"prompt": prompt, "chosen": responses[chosen], "rejected": responses[rejected],
                                "weight": round(weight, 6), "item_id": item["item_id"]})
    agreement = agreement_report([by_item[item["item_id"]] for item in items if item["item_id"] in by_item])
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "labels.jsonl", labels)
    _write_jsonl(out / "rankings.jsonl", rankings)
    _write_jsonl(out / "preferences.jsonl", preferences)
    tmp = out / ".agreement.json.tmp"
    tmp.write_text(json.dumps(agreement, indent=2) + "\n")
    os.replace(tmp, out / "agreement.json")
    return {"items": len(items), "labels": len(labels), "ranked_items": len(rankings),
            "skipped": sum(label["skip"] for label in labels),
            "none_acceptable": sum(label["none_acceptable"] for label in labels),
            "pairs": len(preferences), "pairwise_agreement": agreement["pairwise_agreement"],
            "krippendorff_alpha_ordinal": agreement["krippendorff_alpha_ordinal"],
            "kendall_w_mean": agreement["kendall_w_mean"]}
