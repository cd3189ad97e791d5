"""Assignment: overlap, never twice to one annotator, leases that expire, and what a submission may do."""

import pytest

from rlhfkit.label.assign import next_item, progress, project_progress, submit
from rlhfkit.label.auth import add_annotator
from rlhfkit.label.labels import Label, Problem
from rlhfkit.label.store import Store

from .helpers import make_project

T0 = 1_000_000.0


def setup(tmp_path, names=("a", "b", "c"), **kwargs):
    store = Store(make_project(tmp_path, **kwargs))
    for name in names:
        add_annotator(store, name)
    ids = {a.name: a.id for a in store.annotators()}
    return store, ids


def ranks(item_id, *r):
    return Label(item_id, ranks=tuple(r))


def test_overlap_one_gives_each_item_to_one_annotator(tmp_path):
    store, ids = setup(tmp_path, n=3)
    got = [next_item(store, ids[name], T0)["item_id"] for name in ("a", "b", "c")]
    assert got == [1, 2, 3]
    assert next_item(store, ids["a"], T0)["item_id"] == 1  # asking again: the same item back
    submit(store, ids["a"], ranks(1, 1, 2, 3), T0)
    assert next_item(store, ids["a"], T0) is None  # 2 and 3 are leased to b and c
    assert progress(store, ids["a"]) == {"done": 1, "remaining": 2, "items": 3, "overlap": 1}


def test_overlap_two_gives_each_item_to_two_annotators_never_twice_to_one(tmp_path):
    store, ids = setup(tmp_path, n=2, overlap=2)
    assert next_item(store, ids["a"], T0)["item_id"] == 1
    assert next_item(store, ids["b"], T0)["item_id"] == 1
    assert next_item(store, ids["c"], T0)["item_id"] == 2  # item 1 has its two annotators
    submit(store, ids["a"], ranks(1, 1, 2, 3), T0)
    assert next_item(store, ids["a"], T0)["item_id"] == 2  # never item 1 again
    submit(store, ids["a"], ranks(2, 3, 2, 1), T0)
    submit(store, ids["b"], ranks(1, 1, 3, 2), T0)
    submit(store, ids["c"], ranks(2, 1, 1, 1), T0)
    for name in ("a", "b", "c"):
        assert next_item(store, ids[name], T0) is None
    labels = store.labels()
    assert sorted((l["item_id"], l["annotator"]) for l in labels) == [(1, "a"), (1, "b"), (2, "a"), (2, "c")]
    summary = project_progress(store, T0)
    assert (summary["items"], summary["complete"], summary["labels"]) == (2, 2, 4)
    assert [(p["name"], p["ranked"]) for p in summary["annotators"]] == [("a", 2), ("b", 1), ("c", 1)]


def test_an_abandoned_assignment_returns_to_the_pool_after_the_lease(tmp_path):
    store, ids = setup(tmp_path, n=1, lease_seconds=60)
    assert next_item(store, ids["a"], T0)["item_id"] == 1
    assert next_item(store, ids["b"], T0 + 59) is None
    assert next_item(store, ids["b"], T0 + 61)["item_id"] == 1  # a's lease expired
    # a answers late, after b took the item: refused, the label stays b's to give.
    with pytest.raises(Problem) as late:
        submit(store, ids["a"], ranks(1, 1, 2, 3), T0 + 62)
    assert late.value.status == 409 and "expired and the item went to another annotator" in late.value.message
    submit(store, ids["b"], ranks(1, 3, 2, 1), T0 + 63)
    assert [l["annotator"] for l in store.labels()] == ["b"]


def test_a_late_answer_is_taken_when_nobody_else_took_the_item(tmp_path):
    store, ids = setup(tmp_path, n=1, lease_seconds=60)
    next_item(store, ids["a"], T0)
    stored = submit(store, ids["a"], ranks(1, 2, 1, 3), T0 + 3600)
    assert stored["ranks"] == [2, 1, 3] and stored["annotator"] == "a"


def test_an_expired_lease_comes_back_to_its_holder_when_still_free(tmp_path):
    store, ids = setup(tmp_path, n=2, lease_seconds=60)
    assert next_item(store, ids["a"], T0)["item_id"] == 1
    assert next_item(store, ids["a"], T0 + 600)["item_id"] == 1  # still free: same item, lease renewed
    assert next_item(store, ids["b"], T0 + 601)["item_id"] == 2


def test_a_skip_passes_the_item_on_and_is_never_offered_again(tmp_path):
    store, ids = setup(tmp_path, n=1)
    next_item(store, ids["a"], T0)
    submit(store, ids["a"], Label(1, skip=True, comment="not my field"), T0)
    assert next_item(store, ids["a"], T0) is None
    assert next_item(store, ids["b"], T0)["item_id"] == 1  # a skip does not fill the item
    submit(store, ids["b"], Label(1, none_acceptable=True), T0)  # "none is acceptable" does
    assert next_item(store, ids["c"], T0) is None
    assert progress(store, ids["c"])["remaining"] == 0
    kinds = [(l["annotator"], l["skip"], l["none_acceptable"], l["comment"]) for l in store.labels()]
    assert kinds == [("a", True, False, "not my field"), ("b", False, True, None)]


def test_submission_errors_and_idempotent_retry(tmp_path):
    store, ids = setup(tmp_path, n=2)
    next_item(store, ids["a"], T0)  # item 1 -> a
    next_item(store, ids["b"], T0)  # item 2 -> b

    def refused(annotator, label):
        with pytest.raises(Problem) as err:
            submit(store, ids[annotator], label, T0)
        return err.value.status, err.value.message

    assert refused("a", ranks(7, 1, 2, 3)) == (404, "unknown item 7")
    assert refused("a", ranks(2, 1, 2, 3)) == (403, "item 2 is not assigned to you (get items from GET /api/next)")
    assert refused("c", ranks(1, 1, 2, 3))[0] == 403
    assert refused("a", ranks(1, 1, 2)) == (422, "field 'ranks': item 1 has 3 responses, got 2 ranks")
    assert refused("a", ranks(1, 1, 2, 4)) == (422, "field 'ranks[2]': 4 is not between 1 (best) and 3")
    assert refused("a", ranks(1, 0, 2, 3)) == (422, "field 'ranks[0]': 0 is not between 1 (best) and 3")
    assert refused("a", ranks(1, 2, 2, 3)) == (422, "field 'ranks': no response is ranked 1 (the best)")
    first = submit(store, ids["a"], Label(1, ranks=(2, 1, 2), comment="close call"), T0)
    again = submit(store, ids["a"], Label(1, ranks=(2, 1, 2), comment="close call"), T0 + 5)
    assert first == again and first["created_at"] == T0  # a retry gets the stored label, nothing new
    assert refused("a", Label(1, ranks=(1, 2, 3)))[0] == 409
    assert refused("a", Label(1, ranks=(2, 1, 2)))[0] == 409  # the comment differs
    assert refused("a", Label(1, skip=True)) == (409, "item 1 is already labelled by you, differently; a stored "
                                                      "label is not changed")
    assert len(store.labels()) == 1
