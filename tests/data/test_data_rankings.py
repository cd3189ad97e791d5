from rlhfkit.data import ranking_to_pairs, rankings_to_preferences


def pairs_of(n, ranking=None):
    record = {"prompt": "p", "responses": [f"r{i}" for i in range(n)], "ranking": ranking or list(range(n))}
    return [(p["chosen"], p["rejected"]) for p in ranking_to_pairs(record)]


def test_three_responses_give_three_pairs_in_order():
    record = {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
    assert ranking_to_pairs(record) == [
        {"prompt": "Q", "chosen": "c", "rejected": "a"},
        {"prompt": "Q", "chosen": "c", "rejected": "b"},
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
    ]


def test_four_responses_give_six_pairs_and_best_beats_all():
    pairs = pairs_of(4, [3, 1, 0, 2])
    assert len(pairs) == 6
    assert pairs[:3] == [("r3", "r1"), ("r3", "r0"), ("r3", "r2")]
    assert all(rejected != "r3" for _, rejected in pairs)
    assert all(chosen != "r2" for chosen, _ in pairs)  # the worst never wins


def test_partial_ranking_ignores_unranked():
    assert pairs_of(5, [4, 1]) == [("r4", "r1")]


def test_many_records_concatenate():
    records = [{"prompt": "a", "responses": ["x", "y"], "ranking": [1, 0]},
               {"prompt": "b", "responses": ["u", "v", "w"], "ranking": [0, 1, 2]}]
    out = rankings_to_preferences(records)
    assert [p["prompt"] for p in out] == ["a", "b", "b", "b"]
    assert out[0] == {"prompt": "a", "chosen": "y", "rejected": "x"}


def test_conversational_kept_as_messages():
    prompt = [{"role": "user", "content": "hi"}]
    a, b = [{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}]
    record = {"prompt": prompt, "responses": [a, b], "ranking": [1, 0]}
    assert ranking_to_pairs(record) == [{"prompt": prompt, "chosen": b, "rejected": a}]
