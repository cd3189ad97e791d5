"""Export: the files `rlhfkit reward` and `rlhfkit dpo` read, ties making no pair, consensus and vote weights
with overlap, and agreement.json, on labels worked out by hand."""

import json

import pytest

from rlhfkit.data.loading import load_records
from rlhfkit.label.agreement import krippendorff_alpha
from rlhfkit.label.assign import next_item, submit
from rlhfkit.label.auth import add_annotator
from rlhfkit.label.export import consensus_ranks, export, majority_pairs
from rlhfkit.label.labels import Label
from rlhfkit.label.store import Store

from .helpers import make_project


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def label_all(store, answers):
    """answers: annotator -> list of Labels in the order the annotator is given the items."""
    for name in answers:
        add_annotator(store, name)
    ids = {a.name: a.id for a in store.annotators()}
    for name, labels in answers.items():
        for label in labels:
            assert next_item(store, ids[name])["item_id"] == label.item_id
            submit(store, ids[name], label)


def test_overlap_one_ranks_become_all_ordered_pairs_and_ties_make_none(tmp_path):
    store = Store(make_project(tmp_path, n=3, k=3))
    label_all(store, {"a": [Label(1, ranks=(2, 1, 3)), Label(2, ranks=(1, 1, 2), comment="A = B"),
                            Label(3, skip=True)]})
    summary = export(store, tmp_path / "out")
    prefs = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    item1, item2 = store.item(1), store.item(2)
    r1, r2 = item1["responses"], item2["responses"]
    assert [(p["chosen"], p["rejected"], p["weight"]) for p in prefs] == [
        (r1[1], r1[0], 1.0), (r1[1], r1[2], 1.0), (r1[0], r1[2], 1.0),  # 1 > 0 > 2: three pairs
        (r2[0], r2[2], 1.0), (r2[1], r2[2], 1.0)]                        # tie of 0 and 1: no pair between them
    assert all(p["prompt"] == item1["prompt"] for p in prefs[:3])
    rankings = read_jsonl(tmp_path / "out" / "rankings.jsonl")
    assert [(r["item_id"], r["ranking"], r["ranks"]) for r in rankings] == [(1, [1, 0, 2], [2, 1, 3]),
                                                                             (2, [0, 1, 2], [1, 1, 3])]
    # What `rlhfkit reward --data` and `rlhfkit dpo --data` read (through load_records), and the ranking kind.
    assert [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in prefs] == \
        load_records(tmp_path / "out" / "preferences.jsonl", "preference")
    assert len(load_records(tmp_path / "out" / "rankings.jsonl", "ranking")) == 2
    labels = read_jsonl(tmp_path / "out" / "labels.jsonl")
    assert [(l["item_id"], l["ranks"], l["skip"], l["comment"]) for l in labels] == [
        (1, [2, 1, 3], False, None), (2, [1, 1, 2], False, "A = B"), (3, None, True, None)]
    assert summary["pairs"] == 5 and summary["ranked_items"] == 2 and summary["skipped"] == 1
    agreement = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert agreement["items_ranked"] == 2 and agreement["items_ranked_by_several"] == 0
    assert agreement["pairwise_agreement"] is None


def test_overlap_three_consensus_weights_and_agreement_by_hand(tmp_path):
    store = Store(make_project(tmp_path, n=3, k=3, overlap=3))
    label_all(store, {
        "a": [Label(1, ranks=(1, 2, 3)), Label(2, ranks=(1, 1, 2)), Label(3, none_acceptable=True)],
        "b": [Label(1, ranks=(1, 3, 2)), Label(2, ranks=(1, 1, 3)), Label(3, ranks=(3, 2, 1))],
        "c": [Label(1, ranks=(2, 1, 3)), Label(2, skip=True), Label(3, ranks=(1, 2, 3))],
    })
    export(store, tmp_path)
    r1, r2 = store.item(1)["responses"], store.item(2)["responses"]
    prefs = [(p["item_id"], p["chosen"], p["rejected"], p["weight"]) for p in read_jsonl(tmp_path / "preferences.jsonl")]
    # Item 1: 0 over 1 by a, b (c says 1 over 0): 2/3; 0 over 2 by all: 1; 1 over 2 by a, c: 2/3.
    # Item 2 (a and b ranked; c skipped): 0 and 1 tied by both: no pair; both over 2 by both: 1.
    # Item 3 (b and c ranked, in opposite orders; a: none acceptable): every pair split 1:1, no pair.
    assert prefs == [(1, r1[0], r1[1], pytest.approx(2 / 3, abs=1e-6)), (1, r1[0], r1[2], 1.0),
                     (1, r1[1], r1[2], pytest.approx(2 / 3, abs=1e-6)), (2, r2[0], r2[2], 1.0), (2, r2[1], r2[2], 1.0)]
    rankings = read_jsonl(tmp_path / "rankings.jsonl")
    # Mean mid-ranks: item 1 (4/3, 2, 8/3); item 2 (1.5, 1.5, 3); item 3 (2, 2, 2).
    assert [(r["ranks"], r["ranking"], r["annotators"]) for r in rankings] == [
        ([1, 2, 3], [0, 1, 2], 3), ([1, 1, 3], [0, 1, 2], 2), ([1, 1, 1], [0, 1, 2], 2)]
    agreement = json.loads((tmp_path / "agreement.json").read_text())
    # Pairwise: item 1 agrees on 5 of 9 (annotator pairs x response pairs), item 2 on 3 of 3, item 3 on 0 of 3.
    assert agreement["pairwise_agreement"] == pytest.approx(8 / 15) and agreement["pairwise_comparisons"] == 15
    # Strict: item 2's tied pair is left out: (5 + 2 + 0) / (9 + 2 + 3).
    assert agreement["pairwise_agreement_strict"] == pytest.approx(7 / 14)
    # Kendall's W: item 1 4/9, item 2 1 (same ties), item 3 0 (opposite): mean 13/27.
    assert agreement["kendall_w_mean"] == pytest.approx(13 / 27) and agreement["kendall_w_items"] == 3
    units = [[1, 1, 2], [2, 3, 1], [3, 2, 3], [1.5, 1.5], [1.5, 1.5], [3, 3], [3, 1], [2, 2], [1, 3]]
    assert agreement["krippendorff_alpha_ordinal"] == pytest.approx(krippendorff_alpha(units, "ordinal"))
    assert agreement["krippendorff_alpha_interval"] == pytest.approx(krippendorff_alpha(units, "interval"))
    assert agreement["per_annotator"] == {
        "a": {"agreement": pytest.approx(7 / 9), "comparisons": 9},
        "b": {"agreement": pytest.approx(6 / 12), "comparisons": 12},
        "c": {"agreement": pytest.approx(3 / 9), "comparisons": 9}}


def test_identical_responses_make_no_pair_and_majority_orders_by_consensus():
    assert majority_pairs([[3, 1, 2]]) == [(1, 2, 1.0), (1, 0, 1.0), (2, 0, 1.0)]
    assert consensus_ranks([[1, 2, 3], [3, 2, 1]]) == [1, 1, 1]
    assert consensus_ranks([[1, 2, 2], [1, 3, 2]]) == [1, 3, 2]


def test_duplicate_texts_are_left_out(tmp_path):
    from rlhfkit.label.store import create_project

    store = Store(create_project(tmp_path / "labels.sqlite", [{"prompt": "p", "responses": ["same", "same", "x"]}]))
    label_all(store, {"a": [Label(1, ranks=(1, 2, 3))]})
    export(store, tmp_path / "out")
    assert [(p["chosen"], p["rejected"]) for p in read_jsonl(tmp_path / "out" / "preferences.jsonl")] == [
        ("same", "x"), ("same", "x")]
