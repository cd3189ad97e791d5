import json

from transformers import AutoModelForSequenceClassification

from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.reward import run_reward

from .helpers import keyword_pairs, tiny_config, write_jsonl


def test_reward_model_learns_a_synthetic_rule(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_pairs(256, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", keyword_pairs(100, seed=2))
    out = tmp_path / "rm"
    config = tiny_config("reward", data=train, eval_data=held, output_dir=out, max_steps=48, batch_size=16,
                         learning_rate=2e-3, eval_every=24, eval_batches=0, progress=False, warmup_ratio=0.1)
    run_reward(config)
    rows = read_metrics(out / "metrics.jsonl")
    final = rows[-1]
    assert final["eval/accuracy"] > 0.95, final
    assert final["eval/loss"] < 0.3
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and len(saved["id2label"]) == 1
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.score.weight.shape[0] == 1


def test_gold_agreement_is_reported_with_a_gold_scorer(tmp_path):
    rows = keyword_pairs(40, seed=3)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "rm"
    config = tiny_config("reward", data=train, output_dir=out, max_steps=2, progress=False,
                         gold_scorer="tests.trainers.gold_rule:score", eval_fraction=0.25)
    run_reward(config)
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert 0.0 <= final["eval/gold_agreement"] <= 1.0
    assert "eval/accuracy" in final
