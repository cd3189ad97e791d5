"""The command line: help, errors as one line with exit status 2, nothing written on bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from rlhfkit.cli import main
from rlhfkit.config import STAGES


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_lists_every_field_with_its_help(stage, capsys):
    assert main([stage, "--help"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(STAGES[stage]):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f.metadata["help"] in text


def error_line(stage, args, capsys):
    code = main([stage, *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_flags_and_values(capsys):
    assert "unknown key 'bogus'" in error_line("sft", ["--bogus", "1"], capsys)
    assert "key 'batch_size': expected int, got 'x'" in error_line("sft", ["--batch-size", "x"], capsys)
    assert "'sgd' is not one of" in error_line("sft", ["--lr-scheduler", "sgd"], capsys)
    assert "must be < max_length" in error_line("sft", ["--max-prompt-length", "300"], capsys)
    assert "unknown preset 'huge'" in error_line("sft", ["--preset", "huge"], capsys)
    assert "--data is required" in error_line("reward", ["--preset", "tiny", "--output-dir", "/nonexistent/x"], capsys)


def test_config_file_errors_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("learning_rate: 1.0e-4\nbatch_sise: 4\n")
    assert f"{bad}:2: unknown key 'batch_sise' (did you mean batch_size?)" in error_line("sft", ["--config", bad], capsys)
    bad.write_text("max_steps: many\n")
    assert f"{bad}:1: key 'max_steps': expected int, got 'many'" in error_line("sft", ["--config", bad], capsys)
    bad.write_text("a: [1, 2\n")
    err = error_line("sft", ["--config", bad], capsys)
    assert err.startswith(f"rlhfkit sft: error: {bad}:") and "invalid YAML" in err


def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    out = tmp_path / "out"
    err = error_line("reward", ["--preset", "tiny", "--data", data, "--output-dir", out], capsys)
    assert f"{data}:2" in err and "rejected" in err
    assert not out.exists()
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    err = error_line("sft", ["--preset", "tiny", "--data", data, "--output-dir", out], capsys)
    assert f"{data}:2" in err
    assert not out.exists()


def test_config_file_and_flags_override_in_order(tmp_path):
    from rlhfkit.config_parsing import build_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 5\nlearning_rate: 0.01\n")
    config = build_config("sft", str(cfg), "tiny", [("learning_rate", "0.5"), ("progress", "false")])
    assert config.model == "tiny"            # from the preset
    assert config.max_steps == 5             # the file beats the preset's 8
    assert config.learning_rate == 0.5       # the flag beats the file
    assert config.progress is False


def test_sft_annotate_reward_through_the_command(tmp_path):
    """The three stages chained through the real command, as a user would run them."""
    sft, ann, rm = tmp_path / "sft", tmp_path / "ann", tmp_path / "rm"
    done = run_cli("sft", "--preset", "tiny", "--output-dir", sft, "--max-steps", "2", "--progress", "false")
    assert done.returncode == 0, done.stderr
    assert f"wrote {sft}" in done.stdout
    done = run_cli("annotate", "--preset", "tiny", "--model", sft, "--output-dir", ann, "--num-prompts", "4")
    assert done.returncode == 0, done.stderr
    summary = json.loads((ann / "summary.json").read_text())
    assert summary["prompts"] == 4 and summary["responses"] == 12
    done = run_cli("reward", "--preset", "tiny", "--model", sft, "--data", ann / "preferences.jsonl",
                   "--output-dir", rm, "--max-steps", "2", "--gold-scorer", "vader", "--progress", "false")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (rm / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "eval/accuracy" in rows[-1]
    assert (rm / "model.safetensors").is_file() and (rm / "checkpoints" / "step-2").is_dir()


def test_flags_files_and_pipelines_share_one_coercion(tmp_path):
    """Flags go through transformers' HfArgumentParser over the config dataclasses, but every value, from a flag,
    a stage's YAML file or a pipeline file, is converted and checked by the same function."""
    from rlhfkit.config import PipelineSettings
    from rlhfkit.config_parsing import build_config, parse_flags
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import load_pipeline

    sources, flags = parse_flags(STAGES["ppo"], ["--value-clip", "null", "--adaptive-kl", "--whiten-advantages", "off",
                                                 "--kl-coef=0.2", "--preset", "tiny"], "rlhfkit ppo")
    assert flags == {"value_clip": None, "adaptive_kl": True, "whiten_advantages": False, "kl_coef": 0.2}
    assert (sources.preset, sources.config) == ("tiny", None)
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text("value_clip: null\nadaptive_kl: 'on'\nkl_coef: 0.3\n")
    config = build_config("ppo", str(config_file), "tiny", flags)
    assert config.value_clip is None and config.adaptive_kl and config.kl_coef == 0.2  # the flag wins over the file
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text("model: tiny\nkeep_checkpoints: 'yes'\nstages: [sft]\n")
    _, pipe_flags = parse_flags(PipelineSettings, ["--seed", "7", "--algos", "ppo,dpo"], "rlhfkit pipeline")
    pipe = load_pipeline(pipeline, pipe_flags)
    assert pipe.keep_checkpoints is True and pipe.seed == 7 and pipe.stages == ["sft", "ppo", "dpo"]
    with pytest.raises(ConfigError, match=r"^--seed: key 'seed': expected int, got 'x'$"):
        parse_flags(PipelineSettings, ["--seed", "x"], "rlhfkit pipeline")
    pipeline.write_text("model: tiny\nkeep_checkpoints: maybe\n")
    with pytest.raises(ConfigError, match=r"pipe.yaml:2: key 'keep_checkpoints': expected bool, got 'maybe'"):
        load_pipeline(pipeline)
    with pytest.raises(ConfigError, match=r"expected one argument"):
        parse_flags(STAGES["sft"], ["--learning-rate"], "rlhfkit sft")
