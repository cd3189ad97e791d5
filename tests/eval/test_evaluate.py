import json

import pytest

from rlhfkit.errors import ConfigError

from rlhfkit.eval.evaluate import run_eval
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.tiny import build_tiny_model

from ..trainers.helpers import tiny_config, write_jsonl

KEYS = ("gold_reward", "kl_exact", "kl_to_reference", "win_rate_vs_reference", "response_length", "proxy_reward")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model (another seed): a reference the policy really differs from."""
    folder = tmp_path_factory.mktemp("other")
    tokenizer = load_tokenizer("tiny")
    build_tiny_model(tokenizer, seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_writes_means_intervals_and_samples(tmp_path, other_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about {w}"} for w in "abcdef"])
    out = tmp_path / "ev"
    run_eval(tiny_config("eval", data=prompts, output_dir=out, ref_model=other_model, reward_model=other_model,
                         samples_per_prompt=2, max_new_tokens=8, progress=False))
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 12 and result["n_prompts"] == 6
    for key in KEYS:
        lo, hi = result[f"{key}_ci95"]
        assert lo <= result[f"{key}_mean"] <= hi, key
    # Samples come from the policy, so the summed log-ratio estimates KL(policy || ref) > 0 for a different ref.
    assert result["kl_to_reference_mean"] > 1.0 and result["kl_exact_mean"] > 1.0
    assert 0.0 <= result["win_rate_vs_reference_mean"] <= 1.0
    assert 1 <= result["response_length_mean"] <= 8
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {"prompt", "response", "gold", "kl", "kl_exact", "reference_response", "proxy"} <= set(samples[0])
    assert samples[0]["prompt"] == samples[1]["prompt"] == "Tell me about a"


def test_eval_against_itself_has_zero_kl(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "Good day"}])
    out = tmp_path / "ev"
    run_eval(tiny_config("eval", data=prompts, output_dir=out, samples_per_prompt=2, max_new_tokens=6, progress=False))
    result = json.loads((out / "eval.json").read_text())
    assert result["kl_to_reference_mean"] == 0.0 and result["kl_to_reference_ci95"] == [0.0, 0.0]
    assert "proxy_reward_mean" not in result
    # Scored on the reference's own samples (one generation pass): every pair ties, and those samples are the
    # ones an evaluation of another policy against this reference draws.
    assert result["win_rate_vs_reference_mean"] == 0.5 and result["win_rate_vs_reference_std"] == 0.0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == [r["reference_response"] for r in rows]
    assert result["gold_reward_mean"] == result["reference_gold_reward_mean"]


def test_reference_samples_are_reused_only_when_sampled_the_same_way(tmp_path, other_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w}"} for w in "abcd"])
    settings = dict(data=prompts, ref_model=other_model, samples_per_prompt=2, max_new_tokens=6, progress=False)
    first, again, reused = tmp_path / "first", tmp_path / "again", tmp_path / "reused"
    run_eval(tiny_config("eval", output_dir=first, **settings))
    # The reference's samples have their own seed: another policy's evaluation draws the very same ones...
    run_eval(tiny_config("eval", output_dir=again, model=other_model, **settings))
    rows = [[json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()] for d in (first, again)]
    assert [r["reference_response"] for r in rows[0]] == [r["reference_response"] for r in rows[1]]
    # ...so it may reuse them, with the same numbers as sampling them again, and without sampling.
    run_eval(tiny_config("eval", output_dir=reused, model=other_model, reference_samples=str(first), **settings))
    a, b = (json.loads((d / "eval.json").read_text()) for d in (again, reused))
    assert a == b and json.loads((reused / "reference.json").read_text())["seed"] == 0
    # Samples of another seed (or other prompts, settings, reference) are refused, before anything is written.
    with pytest.raises(ConfigError, match=r"first/reference.json: sampled differently \(seed\)"):
        run_eval(tiny_config("eval", output_dir=tmp_path / "x", seed=3, reference_samples=str(first), **settings))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="no reusable reference samples"):
        run_eval(tiny_config("eval", output_dir=tmp_path / "y", reference_samples=str(tmp_path), **settings))


def test_best_of_n_picks_by_the_reward_model_and_reports_the_closed_form_kl(tmp_path, other_model):
    from rlhfkit.core.best_of_n import best_of_n_kl
    from rlhfkit.eval.gold import load_gold_scorer

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about {w}"} for w in "abcdef"])
    out = tmp_path / "ev"
    run_eval(tiny_config("eval", data=prompts, output_dir=out, reward_model=other_model, samples_per_prompt=1,
                         max_new_tokens=8, best_of_n=8, progress=False))
    rows = json.loads((out / "eval.json").read_text())["best_of_n"]
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    assert [r["kl"] for r in rows] == [best_of_n_kl(n) for n in (1, 2, 4, 8)]
    drawn = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert [d["prompt"] for d in drawn] == [f"Tell me about {w}" for w in "abcdef"]
    assert all(len(d["responses"]) == len(d["proxy"]) == len(d["gold"]) == 8 for d in drawn)
    # The gold scores in the file are the gold scorer's, and the rows follow from the file by a naive loop.
    gold = load_gold_scorer("vader")
    for d in drawn:
        assert d["gold"] == pytest.approx(gold([d["prompt"]] * 8, d["responses"]))
    for row in rows:
        n = row["n"]
        picked = [max(range(n), key=lambda j: (d["proxy"][j], -j)) for d in drawn]
        assert row["gold_reward_mean"] == pytest.approx(sum(d["gold"][j] for d, j in zip(drawn, picked)) / 6)
        assert row["proxy_reward_mean"] == pytest.approx(sum(d["proxy"][j] for d, j in zip(drawn, picked)) / 6)
    proxies = [r["proxy_reward_mean"] for r in rows]
    assert proxies == sorted(proxies) and proxies[-1] > proxies[0]  # a larger n keeps a higher-scored sample


def test_best_of_n_without_a_reward_model_is_one_clear_error(tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--preset", "tiny", "--best-of-n", "4", "--output-dir", str(out), "--progress", "false"]) == 2
    assert capsys.readouterr().err.strip() == ("rlhfkit eval: error: key 'best_of_n': the best-of-n baseline ranks "
                                               "samples with a reward model; give --reward-model, or set best_of_n "
                                               "to 0")
    assert not out.exists()
