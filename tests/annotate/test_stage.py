import json

from rlhfkit.annotate.stage import run_annotate
from rlhfkit.data.loading import load_records
from rlhfkit.runtime.checkpoint import seed_everything

from ..trainers.helpers import tiny_config, write_jsonl


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_annotate_writes_rankings_pairs_and_gold_apart(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about topic {i}"} for i in range(6)])
    out = tmp_path / "ann"
    config = tiny_config("annotate", data=prompts, output_dir=out, responses_per_prompt=4, label_temperature=0,
                         gold_scorer="tests.annotate.gold_len:score", progress=False)
    run_annotate(config)
    rankings = read_jsonl(out / "rankings.jsonl")
    gold = read_jsonl(out / "gold_scores.jsonl")
    prefs = read_jsonl(out / "preferences.jsonl")
    assert len(rankings) == 6 and all(len(r["responses"]) == 4 for r in rankings)
    # Deterministic annotator: best-first by gold score, and every pair agrees with gold.
    by_text = {}
    for r, g in zip(rankings, gold):
        assert [g["gold"][i] for i in r["ranking"]] == sorted(g["gold"], reverse=True)
        by_text.update(zip(r["responses"], g["gold"]))
    assert prefs and all(by_text[p["chosen"]] > by_text[p["rejected"]] for p in prefs)
    assert len(prefs) <= 6 * 6
    # The reward model's training file carries no gold score, and it is a valid preference file.
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in prefs)
    assert len(load_records(out / "preferences.jsonl", "preference")) == len(prefs)
    assert len(load_records(out / "rankings.jsonl", "ranking")) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 6 and summary["responses"] == 24 and summary["pairs"] == len(prefs)


def test_annotate_is_repeatable_with_a_seed(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Bye"}])
    for name in ("a", "b"):
        seed_everything(123)  # the stage must not depend on the global RNG state it finds
        run_annotate(tiny_config("annotate", data=prompts, output_dir=tmp_path / name, progress=False, seed=7))
    assert (tmp_path / "a" / "rankings.jsonl").read_text() == (tmp_path / "b" / "rankings.jsonl").read_text()
