import json

from rlhfkit.eval.report import build_summary, intervals_apart, write_report
from rlhfkit.pipeline import ALGOS

ORDER = ("sft", *ALGOS)  # the pipeline's order: the starting policy, then the fine-tuning methods


def fake_eval(folder, gold, gold_ci, kl):
    folder.mkdir(parents=True)
    result = {"n": 4, "n_prompts": 2, "samples_per_prompt": 2, "ref_model": "sft", "model": folder.name}
    for key, mean, ci in (("gold_reward", gold, gold_ci), ("kl_to_reference", kl, [kl - 0.5, kl + 0.5]),
                          ("win_rate_vs_reference", 0.5, [0.4, 0.6]), ("response_length", 20.0, [18.0, 22.0])):
        result[f"{key}_mean"], result[f"{key}_ci95"] = mean, ci
    (folder / "eval.json").write_text(json.dumps(result))
    rows = [{"prompt": p, "response": f"{folder.name} says <hi>", "gold": gold} for p in ("a", "a", "b", "b")]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_checks_and_report_page(tmp_path):
    fake_eval(tmp_path / "eval" / "sft", 0.2, [0.15, 0.25], 0.0)
    fake_eval(tmp_path / "eval" / "ppo", 0.5, [0.42, 0.58], 8.0)
    fake_eval(tmp_path / "eval" / "dpo", 0.3, [0.2, 0.4], 2.0)
    fake_eval(tmp_path / "eval" / "best-of-n", 0.3, [0.26, 0.34], 1.0)
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "objective/scores": s * 0.1, "objective/kl": s * 0.2, "ppo/clipfrac": 0.1}) + "\n"
        for s in range(1, 6)))
    summary = build_summary(tmp_path, kl_budget=5.0, timings={"sft": 10.0, "ppo": 50.0}, order=ORDER)
    assert list(summary["policies"]) == ["sft", "ppo", "dpo", "best-of-n"]  # SFT, the recipe's order, the rest
    assert summary["checks"] == {"ppo_gold_above_sft": True, "ppo_kl_within_budget": False,
                                 "dpo_gold_above_sft": False, "dpo_kl_within_budget": True,
                                 "best-of-n_gold_above_sft": True, "best-of-n_kl_within_budget": True}
    assert summary["total_s"] == 60.0
    page = write_report(tmp_path, 5.0, {"sft": 10.0, "ppo": 50.0}, ORDER).read_text()
    assert page.count("data:image/png;base64,") == 2  # gold-vs-KL plane and the PPO curves
    assert "0.500 <span class=ci>[0.420, 0.580]</span>" in page
    assert page.index("<th>sft</th>") < page.index("<th>ppo</th>") < page.index("<th>dpo</th>")
    assert "ppo says &lt;hi&gt;" in page and "<td class=prompt>b</td>" in page  # escaped, one row per prompt
    assert json.loads((tmp_path / "summary.json").read_text())["checks"]["ppo_kl_within_budget"] is False


def test_intervals_apart():
    a = {"gold_reward_ci95": [0.3, 0.5]}
    assert intervals_apart(a, {"gold_reward_ci95": [0.1, 0.29]})
    assert not intervals_apart(a, {"gold_reward_ci95": [0.1, 0.31]})


def test_exact_kl_is_the_headline_and_the_budget_check(tmp_path):
    """The KL budget is checked against the exact KL; the sampled k1 estimate sits beside it in the table. Here
    the sampled mean (noisy, can be negative) is under the budget while the exact KL is over it."""
    fake_eval(tmp_path / "eval" / "sft", 0.2, [0.15, 0.25], 0.0)
    fake_eval(tmp_path / "eval" / "ppo", 0.5, [0.42, 0.58], -0.03)
    result = json.loads((tmp_path / "eval" / "ppo" / "eval.json").read_text())
    result.update({"kl_exact_mean": 6.0, "kl_exact_ci95": [5.5, 6.5]})
    (tmp_path / "eval" / "ppo" / "eval.json").write_text(json.dumps(result))
    summary = build_summary(tmp_path, kl_budget=5.0, timings={}, order=ORDER)
    assert summary["checks"]["ppo_kl_within_budget"] is False
    page = write_report(tmp_path, 5.0, {}, ORDER).read_text()
    assert "KL to reference (nats)</td><td>&ndash;</td><td>6.000" in page  # sft's old eval.json has no exact KL
    assert "KL, sampled k1 estimate (as in training)</td><td>0.000" in page and "-0.030" in page
