"""Everyone's progress and the agreement so far: what the admin sees in the app and `rlhfkit label progress`
prints."""

from __future__ import annotations

from rlhfkit.label.agreement import agreement_report
from rlhfkit.label.assign import project_progress
from rlhfkit.label.store import Store


def rankings_by_item(labels: list[dict]) -> dict[int, dict[str, list[int]]]:
    """item id -> annotator -> ranks, over the labels that rank (skips and "none is acceptable" left out),
    in the order the labels were given."""
    by_item: dict[int, dict[str, list[int]]] = {}
    for label in labels:
        if label["ranks"] is not None:
            by_item.setdefault(label["item_id"], {})[label["annotator"]] = label["ranks"]
    return by_item


def project_report(store: Store) -> dict:
    report = project_progress(store)
    by_item = rankings_by_item(store.labels())
    return {**report, "agreement": agreement_report([by_item[k] for k in sorted(by_item)])}
