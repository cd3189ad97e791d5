"""`rlhfkit pipeline` / `rlhfkit demo`: config checks up front, the whole recipe, rerun skips finished stages."""

import json

import pytest

from rlhfkit.cli import main, runner
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import ALGOS, demo_path, load_pipeline, run_pipeline, stage_config


def test_pipeline_file_errors_name_file_line_and_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("output_dir: x\nstagez: [sft]\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: unknown key 'stagez'"):
        load_pipeline(bad)
    bad.write_text("output_dir: x\nstages: [sft, dance]\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: key 'stages'"):
        load_pipeline(bad)
    bad.write_text("output_dir: x\nsft:\n  max_steps: 3\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"p.yaml:4 \[sft\]: unknown key 'learning_rat'"):
        load_pipeline(bad)
    bad.write_text("output_dir: x\nkeep_checkpoints: 1\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: key 'keep_checkpoints': expected bool, got 1"):
        load_pipeline(bad)
    bad.write_text("output_dir: x\nkeep_checkpoints: true\n")
    assert load_pipeline(bad).keep_checkpoints is True
    bad.write_text("output_dir: x\neval:\n  samples_per_prompt: many\n")
    with pytest.raises(ConfigError, match=r"p.yaml:3 \[eval\]: key 'samples_per_prompt': expected int"):
        load_pipeline(bad)


def test_demo_tiny_runs_the_whole_recipe_and_reruns_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"sft", "ppo"}
    assert set(summary["checks"]) == {"ppo_gold_above_sft", "ppo_kl_within_budget"}
    assert summary["annotate"]["prompts"] == 16 and "accuracy" in summary["reward_model"]
    assert set(summary["timings_s"]) == {"sft", "annotate", "reward", "ppo", "eval-sft", "eval-ppo"}
    page = (out / "report.html").read_text()
    assert "Before and after" in page and "PPO training curves" in page and "Sample generations" in page
    # The best-of-n baseline of the reference: drawn once, by the starting policy's evaluation.
    assert [r["n"] for r in summary["best_of_n"]] == [1, 2, 4, 8, 16] and "Best-of-n baseline" in page
    assert summary["best_of_n"] == summary["policies"]["sft"]["best_of_n"]
    assert "best_of_n" not in summary["policies"]["ppo"] and not (out / "eval" / "ppo" / "best_of_n.jsonl").exists()
    # The capability benchmark (lm-eval, the local task), before and after; the reference is scored once.
    rows = {(r["task"], r["metric"]): r for r in summary["benchmark"]}
    assert set(rows) == {("rlhfkit_reply_choice", "acc"), ("rlhfkit_reply_choice", "acc_norm")}
    acc = rows["rlhfkit_reply_choice", "acc_norm"]
    assert acc["n"] == 40 and set(acc["policies"]) == {"sft", "ppo"}
    assert acc["policies"]["sft"]["delta"] == 0.0 and acc["policies"]["sft"]["delta_stderr"] == 0.0
    assert acc["policies"]["ppo"]["delta"] == pytest.approx(acc["policies"]["ppo"]["value"] - acc["reference"]["value"])
    assert "Capability benchmark (lm-eval)" in page
    saved = [json.loads((out / "eval" / d / "reference_benchmark.json").read_text()) for d in ("sft", "ppo")]
    assert saved[0] == saved[1]
    printed = capsys.readouterr().out  # eval-sft's policy is the reference; eval-ppo reuses its scores
    assert printed.count("(lm-eval) on the policy") == 2 and "(lm-eval) on the reference" not in printed
    for stage in ("sft", "annotate", "reward", "ppo", "eval/sft", "eval/ppo"):
        assert (out / stage / ".done").exists(), stage
    # keep_checkpoints is off: no stage writes a checkpoint after its last step only for it to be deleted.
    for stage in ("sft", "reward", "ppo"):
        assert "checkpoint_at_end: false" in (out / stage / "config.yaml").read_text(), stage
    # The reference's samples are drawn once, by the first evaluation, and reused by the others.
    assert (out / "eval" / "sft" / "reference.json").exists()
    assert f"reference_samples: {out / 'eval' / 'sft'}" in (out / "eval" / "ppo" / "config.yaml").read_text()
    ours, theirs = ([json.loads(x) for x in (out / "eval" / d / "samples.jsonl").read_text().splitlines()]
                    for d in ("sft", "ppo"))
    assert [r["reference_response"] for r in ours] == [r["reference_response"] for r in theirs]
    # Finished stages keep their models but not their checkpoints (keep_checkpoints is false by default).
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "model.safetensors").exists() and not (out / stage / "checkpoints").exists(), stage
    capsys.readouterr()
    run_pipeline(load_pipeline(demo_path("tiny"), {"output_dir": str(out)}), runner)
    assert capsys.readouterr().out.count("already done") == 6
    # --algos on the finished demo runs only the new stages, and the report compares every policy.
    assert main(["demo", "--preset", "tiny", "--output-dir", str(out), "--algos", "ppo,dpo,grpo"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done") == 6 and "running dpo" in printed and "running eval-grpo" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"sft", "ppo", "dpo", "grpo"}
    assert {"dpo_gold_above_sft", "grpo_kl_within_budget"} <= set(summary["checks"])
    for name in ("dpo", "grpo"):
        assert summary["policies"][name]["model"].endswith(name) and summary["policies"][name]["n"] == 16
    page = (out / "report.html").read_text()
    assert "DPO training curves" in page and "GRPO training curves" in page
    # The before/after table, the capability benchmark and the samples side by side.
    assert page.count("<th>grpo</th>") == 3


@pytest.mark.parametrize("preset", ["default", "tiny", "lora"])
def test_demo_presets_configure_every_fine_tuning_method(tmp_path, preset):
    """`--algos` may name any of them: none may fall back to a stage's defaults (RLOO's: 100 iterations at
    TRL's learning rate for large models), which a demo is not tuned for."""
    pipe = load_pipeline(demo_path(preset), {"output_dir": str(tmp_path), "algos": ",".join(ALGOS)})
    assert pipe.stages[-len(ALGOS) - 1:] == [*ALGOS, "eval"]
    for algo in ALGOS:
        assert "max_steps" in pipe.sections[algo] and "learning_rate" in pipe.sections[algo], algo
    rloo = stage_config(pipe, "rloo", {})
    assert (rloo.kl_in_reward, rloo.advantage, rloo.loss_aggregation) == (True, "rloo", "seq-mean-token-sum")
    grpo = stage_config(pipe, "grpo", {})
    assert (rloo.max_new_tokens, rloo.temperature) == (grpo.max_new_tokens, grpo.temperature)


def test_algos_replace_the_fine_tuning_stages_and_are_checked(tmp_path):
    pipe = load_pipeline(demo_path("tiny"), {"output_dir": str(tmp_path), "algos": "dpo,grpo"})
    assert pipe.stages == ["sft", "annotate", "reward", "dpo", "grpo", "eval"]
    with pytest.raises(ConfigError, match="key 'algos': expected a non-empty list of ppo, dpo, grpo, rloo"):
        load_pipeline(demo_path("tiny"), {"output_dir": str(tmp_path), "algos": "ppo,sac"})
    bad = tmp_path / "p.yaml"
    bad.write_text("output_dir: x\nalgos: dpo\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: key 'algos'"):
        load_pipeline(bad)


def test_a_pipeline_system_prompt_reaches_every_stage_and_a_section_may_override_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("output_dir: x\nsystem_prompt: ''\nstages: [sft, annotate, reward, ppo, dpo, eval]\n"
                    "dpo:\n  system_prompt: Be brief.\n")
    pipe = load_pipeline(path)
    prompts = {stage: stage_config(pipe, stage, {}).system_prompt for stage in pipe.stages}
    assert prompts == {"sft": "", "annotate": "", "reward": "", "ppo": "", "dpo": "Be brief.", "eval": ""}
    # Unset, every stage keeps the template's default (None); a flag sets it like the file.
    path.write_text("output_dir: x\nstages: [sft, eval]\n")
    assert {stage_config(load_pipeline(path), s, {}).system_prompt for s in ("sft", "eval")} == {None}
    assert stage_config(load_pipeline(path, {"system_prompt": "Hi."}), "eval", {}).system_prompt == "Hi."
    # The demo preset drops SmolLM2's default system turn (a third of every sequence) in every stage.
    assert stage_config(load_pipeline(demo_path("default"), {"output_dir": str(tmp_path)}), "ppo",
                        {}).system_prompt == ""


def test_a_pipeline_file_extends_another_and_its_keys_win_section_key_by_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("output_dir: base\nseed: 3\nstages: [sft, eval]\nsft:\n  max_steps: 7\n  batch_size: 4\n"
                    "eval: {num_prompts: 5}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../base.yaml\noutput_dir: child\nsft:\n  batch_size: 2\n  learning_rat: 1\n")
    # A key of either file is reported at its own file and line.
    with pytest.raises(ConfigError, match=r"child.yaml:5 \[sft\]: unknown key 'learning_rat'"):
        load_pipeline(child)
    child.write_text("extends: ../base.yaml\noutput_dir: child\nsft:\n  batch_size: 2\neval:\n")
    pipe = load_pipeline(child)
    assert (str(pipe.output_dir), pipe.seed, pipe.stages) == ("child", 3, ["sft", "eval"])
    assert pipe.sections["sft"] == {"max_steps": 7, "batch_size": 2} and pipe.sections["eval"] == {"num_prompts": 5}
    base.write_text("output_dir: base\nsft:\n  max_steps: seven\n")
    with pytest.raises(ConfigError, match=r"base.yaml:3 \[sft\]: key 'max_steps': expected int"):
        load_pipeline(child)
    # A packaged pipeline by name; a missing file, an unknown name and a cycle are one clear error each.
    child.write_text("extends: demo-tiny\noutput_dir: child\nlora_r: 4\n")
    assert load_pipeline(child).sections["ppo"]["max_steps"] == 4
    for target, message in [("nothere.yaml", r"child.yaml:1: key 'extends': .*nothere.yaml: no such file"),
                            ("demo-huge", r"child.yaml:1: key 'extends': unknown preset 'demo-huge'"),
                            ("child.yaml", r"extends this file again \(a cycle\)")]:
        child.write_text(f"extends: {target}\n")
        with pytest.raises(ConfigError, match=message):
            load_pipeline(child)


def test_a_pipeline_lora_rank_reaches_every_trained_stage_and_a_section_may_override_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("output_dir: x\nlora_r: 8\nstages: [sft, annotate, reward, ppo, dpo, grpo, rloo, eval]\n"
                    "dpo: {lora_r: 0}\n")
    pipe = load_pipeline(path)
    ranks = {stage: getattr(stage_config(pipe, stage, {}), "lora_r", None) for stage in pipe.stages}
    assert ranks == {"sft": 8, "annotate": None, "reward": 8, "ppo": 8, "dpo": 0, "grpo": 8, "rloo": 8, "eval": None}
    path.write_text("output_dir: x\nstages: [sft, ppo]\n")
    assert {stage_config(load_pipeline(path), s, {}).lora_r for s in ("sft", "ppo")} == {0}  # unset: full
    assert stage_config(load_pipeline(path, {"lora_r": 16}), "ppo", {}).lora_r == 16  # `--lora-r 16`
    # The LoRA demo: the demo's recipe with rank 16 everywhere and its own learning rates.
    demo, lora = (load_pipeline(demo_path(p), {"output_dir": str(tmp_path)}) for p in ("default", "lora"))
    assert lora.lora_r == 16 and lora.sections["ppo"]["max_steps"] == demo.sections["ppo"]["max_steps"]
    for stage in ("sft", "reward", "ppo", "dpo", "grpo", "rloo"):
        assert stage_config(lora, stage, {}).learning_rate > stage_config(demo, stage, {}).learning_rate, stage
