from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.data.split import split_records


def test_split_is_deterministic_and_disjoint():
    records = [{"prompt": f"p{i}"} for i in range(50)]
    train, held = split_records(records, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert split_records(records, 0.1, seed=3) == (train, held)
    assert split_records(records, 0.1, seed=4) != (train, held)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_records_sharing_a_key_stay_on_one_side():
    records = [{"prompt": f"p{i % 7}", "completion": str(i)} for i in range(70)]
    train, held = split_records(records, 0.3, seed=0, key=lambda r: r["prompt"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len(held) == 20  # 2 of 7 prompts (round(2.1)), 10 records each


def test_no_split_when_nothing_to_hold_out():
    assert split_records([{"a": 1}], 0.5, 0) == ([{"a": 1}], [])
    assert split_records([{"a": 1}, {"a": 2}], 0.0, 0) == ([{"a": 1}, {"a": 2}], [])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=2, max_size=60), st.floats(0.01, 0.9), st.integers(0, 10))
def test_split_partitions_the_records(keys, fraction, seed):
    records = [{"prompt": str(k), "i": i} for i, k in enumerate(keys)]
    train, held = split_records(records, fraction, seed, key=lambda r: r["prompt"])
    assert sorted(r["i"] for r in train + held) == list(range(len(keys)))
    if len(set(keys)) >= 2:
        assert held and train
