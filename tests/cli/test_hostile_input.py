"""Hostile input through the real command line: every command that reads a user's file answers a broken one
with exit status 2 and one line on stderr naming the file, the line and the field, and writes nothing.

The corpus is `tests/data/bad/` (see its README); the 50 MB line is generated here. Commands run in-process
(`rlhfkit.cli.main`, as test_cli.py does) for speed; one subprocess run per entry point checks that the real
process prints the same single line and no traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.cli import main

BAD = Path(__file__).parents[1] / "data" / "bad"
GOOD = {"prompt": "Hi there", "completion": "Hello!", "chosen": "Hello!", "rejected": "Go away."}

# command -> (record kind it reads from --data, flags that get it past everything but the data)
COMMANDS = {
    "sft": ("sft", ["--preset", "tiny"]),
    "reward": ("preference", ["--preset", "tiny"]),
    "dpo": ("preference", ["--preset", "tiny"]),
    "annotate": ("prompt", ["--preset", "tiny"]),
    "ppo": ("prompt", ["--preset", "tiny", "--reward-model", "tiny"]),
    "grpo": ("prompt", ["--preset", "tiny", "--reward-model", "tiny"]),
    "rloo": ("prompt", ["--preset", "tiny", "--reward-model", "tiny"]),
    "eval": ("prompt", ["--preset", "tiny", "--model", "tiny"]),
}

# bad file -> (line the error must name or None for a file-level error, field or None, words of the message)
BAD_FOR_EVERY_KIND = {
    "malformed_json.jsonl": (2, None, "invalid JSON"),
    "not_an_object.jsonl": (2, None, "expected a JSON object, got a list"),
    "wrong_type.jsonl": (3, "prompt", "must be a string or a list of messages, got a number"),
    "missing_field.jsonl": (2, "prompt", "missing"),
    "empty_field.jsonl": (2, "prompt", "must not be empty"),
    "invalid_utf8.jsonl": (2, None, "invalid UTF-8 at byte"),
    "role_robot.jsonl": (2, "prompt[0].role", "unknown role 'robot'"),
    "assistant_first.jsonl": (2, "prompt[0].role", "must open with a user turn"),
    "missing_content.jsonl": (2, "prompt[0].content", "missing"),
    "empty.jsonl": (None, None, "no records"),
    "blank_lines.jsonl": (None, None, "no records"),
    "data.csv": (None, None, "unsupported file type '.csv'"),
    "truncated.parquet": (None, None, "cannot read Parquet"),
    "wrong_columns.parquet": (None, "prompt", "column missing (the file has columns: text, label)"),
    "wrong_type.parquet": (1, "prompt", "must be a string or a list of messages, got a number"),
}
BAD_FOR_KIND = {
    "sft": {"sft_missing_completion.jsonl": (2, "completion", "missing"),
            "sft_messages_assistant_first.jsonl": (2, "messages[0].role", "must open with a user turn")},
    "preference": {"preference_missing_rejected.jsonl": (2, "rejected", "missing"),
                   "preference_margin_string.jsonl": (2, "margin", "must be a number, got a string")},
    "prompt": {},
}

DATA_CASES = [(command, name, expected)
              for command, (kind, _) in COMMANDS.items()
              for name, expected in {**BAD_FOR_EVERY_KIND, **BAD_FOR_KIND[kind]}.items()]

# config file -> (line, words); the same file is refused by every stage
BAD_CONFIGS = {
    "config_unknown_key.yaml": (2, "unknown key 'batch_sise'"),
    "config_wrong_type.yaml": (2, "key 'max_length': expected int, got 'long'"),
    "config_null_value.yaml": (2, "key 'max_length': must not be null"),
    "config_malformed.yaml": (3, "invalid YAML"),
    "config_not_mapping.yaml": (1, "a config file must be a mapping"),
    "config_python_tag.yaml": (1, "the tag '!!python/object/apply:os.system' is not allowed"),
    "config_invalid_utf8.yaml": (None, "not UTF-8 text"),
}
BAD_PIPELINES = {
    "pipeline_unknown_key.yaml": (3, "unknown key 'sft_steps'"),
    "pipeline_wrong_type.yaml": ("4 [sft]", "key 'max_steps': expected int, got 'lots'"),
    "pipeline_malformed.yaml": (3, "invalid YAML"),
    "pipeline_python_tag.yaml": (3, "the tag '!!python/object/apply:os.system' is not allowed"),
}


def run(args, capsys) -> tuple[int, str]:
    """The command in-process: (exit status, stderr). Anything but a clean exit would raise here."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code: int, err: str, path, line, field, words, command: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    message = lines[0]
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(f"rlhfkit {command}: error: {where}"), message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert words in message, message
    return message


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(autouse=True)
def _no_writes_outside_tmp(tmp_path, monkeypatch):
    # Commands default some outputs to ./runs; run them where a stray write would be visible and harmless.
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("command, name, expected", DATA_CASES, ids=[f"{c}-{n}" for c, n, _ in DATA_CASES])
def test_bad_data_file(command, name, expected, tmp_path, capsys):
    _, flags = COMMANDS[command]
    out = tmp_path / "out"
    code, err = run([command, *flags, "--data", BAD / name, "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / name, *expected, command)
    assert not out.exists()


@pytest.mark.parametrize("command", ["sft", "reward", "dpo"])
def test_bad_eval_data_file(command, tmp_path, capsys):
    """--eval-data is read as strictly as --data."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "out"
    code, err = run([command, "--preset", "tiny", "--data", good, "--eval-data", BAD / "role_robot.jsonl",
                     "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / "role_robot.jsonl", 2, "prompt[0].role", "unknown role", command)
    assert not out.exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_existing_output_dir_is_left_byte_for_byte(command, tmp_path, capsys):
    _, flags = COMMANDS[command]
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 7\n")
    (out / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    before = snapshot(out)
    code, err = run([command, *flags, "--data", BAD / "malformed_json.jsonl", "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / "malformed_json.jsonl", 2, None, "invalid JSON", command)
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def huge_line_files(tmp_path_factory):
    """A valid first line, then one 50 MB line: a record whose prompt is 50 MB of text, and the same cut
    short (invalid JSON). Made once per module: writing them is most of the cost."""
    folder = tmp_path_factory.mktemp("huge")
    size = 50 * 1024 * 1024
    valid = folder / "huge_prompt.jsonl"
    with open(valid, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n")
        handle.write('{"prompt": "' + "a" * size + '", "completion": "b", "chosen": "c", "rejected": "d"}\n')
    broken = folder / "huge_broken.jsonl"
    with open(broken, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(GOOD) + "\n")
        handle.write('{"prompt": "' + "a" * size + "\n")
    return valid, broken


@pytest.mark.parametrize("command", list(COMMANDS))
def test_50_mb_line(command, huge_line_files, tmp_path, capsys):
    """Refused from its length alone, fast, in a short message: never tokenised (minutes, gigabytes)."""
    valid, _ = huge_line_files
    _, flags = COMMANDS[command]
    out = tmp_path / "out"
    code, err = run([command, *flags, "--data", valid, "--output-dir", out], capsys)
    message = assert_one_line_error(code, err, valid, 2, "prompt", "52,428,800 characters long", command)
    assert len(message) < 400
    assert not out.exists()


def test_50_mb_line_of_broken_json_gives_a_short_message(huge_line_files, tmp_path, capsys):
    _, broken = huge_line_files
    code, err = run(["sft", "--preset", "tiny", "--data", broken, "--output-dir", tmp_path / "out"], capsys)
    message = assert_one_line_error(code, err, broken, 2, None, "invalid JSON", "sft")
    assert len(message) < 400


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_file(command, name, tmp_path, capsys):
    line, words = BAD_CONFIGS[name]
    out = tmp_path / "out"
    code, err = run([command, "--config", BAD / name, "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / name, line, None, words, command)
    assert not out.exists()
    # The python tag's payload would have created this file in the working directory (tmp_path).
    assert not (tmp_path / "rlhfkit-yaml-marker").exists()


@pytest.mark.parametrize("name", list(BAD_PIPELINES))
def test_bad_pipeline_file(name, tmp_path, capsys):
    line, words = BAD_PIPELINES[name]
    out = tmp_path / "out"
    code, err = run(["pipeline", BAD / name, "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / name, line, None, words, "pipeline")
    assert not out.exists()
    assert not (tmp_path / "rlhfkit-yaml-marker").exists()


# stage section of a pipeline -> the kind of data it reads. `eval` comes last: its prompts must be checked
# before the training stages run, not after.
PIPELINE_SECTIONS = {"sft": "sft", "reward": "preference", "eval": "prompt"}
PIPELINE_CASES = [(section, name, expected)
                  for section, kind in PIPELINE_SECTIONS.items()
                  for name, expected in {**BAD_FOR_EVERY_KIND, **BAD_FOR_KIND[kind]}.items()]


@pytest.mark.parametrize("section, name, expected", PIPELINE_CASES,
                         ids=[f"{s}-{n}" for s, n, _ in PIPELINE_CASES])
def test_bad_data_file_in_a_pipeline(section, name, expected, tmp_path, capsys):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"model: tiny\nstages: [sft, annotate, reward, ppo, eval]\n"
                        f"{section}:\n  data: {json.dumps(str(BAD / name))}\n")
    out = tmp_path / "out"
    code, err = run(["pipeline", pipeline, "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / name, *expected, "pipeline")
    assert not out.exists()


def test_pipeline_existing_output_dir_is_left_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "timings.json").write_text('{"sft": 1.0}')
    before = snapshot(out)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"model: tiny\nstages: [sft, eval]\neval:\n  data: {json.dumps(str(BAD / 'empty.jsonl'))}\n")
    code, err = run(["pipeline", pipeline, "--output-dir", out], capsys)
    assert_one_line_error(code, err, BAD / "empty.jsonl", None, None, "no records", "pipeline")
    assert snapshot(out) == before


LONG_PROMPT = " ".join(["word"] * 3000)


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "annotate", "eval"])
def test_context_longer_than_the_model_is_a_config_error(command, tmp_path, capsys):
    """Prompts are cut from the left to max_prompt_length (TRL's keep-end truncation), so a long prompt is
    never an error by itself; a config whose sequences outgrow the model's positions (the tiny model has
    512) is, naming the key, before anything is written."""
    kind, flags = COMMANDS[command]
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(dict(GOOD, prompt=LONG_PROMPT)) + "\n" + json.dumps(GOOD) + "\n")
    out = tmp_path / "out"
    generation = ["--max-new-tokens", "100"] if kind == "prompt" else []
    code, err = run([command, *flags, "--data", data, "--output-dir", out, "--max-prompt-length", "500",
                     "--max-length", "600", *generation], capsys)
    assert code == 2, err
    message = err.strip()
    assert "\n" not in message and "Traceback" not in message
    key = "max_new_tokens" if command == "eval" else "max_length"
    assert message.startswith(f"rlhfkit {command}: error: key '{key}': sequences of up to"), message
    assert "max_position_embeddings = 512" in message
    assert not out.exists()


def test_long_prompt_is_truncated_not_refused(tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(dict(GOOD, prompt=LONG_PROMPT + f" {i}")) + "\n" for i in range(4)))
    out = tmp_path / "out"
    code, err = run(["sft", "--preset", "tiny", "--data", data, "--eval-data", data, "--output-dir", out,
                     "--max-steps", "1", "--batch-size", "2", "--progress", "false"], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("args", [
    ["sft", "--preset", "tiny", "--data", BAD / "invalid_utf8.jsonl"],
    ["pipeline", BAD / "pipeline_python_tag.yaml"],
], ids=["sft", "pipeline"])
def test_real_process_prints_one_line(args, tmp_path):
    """`python -m rlhfkit` as a user runs it: warnings or log lines would show up here, not in capsys."""
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "rlhfkit", *map(str, args), "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert str(args[-1]) in done.stderr
    assert not out.exists()
    assert not (tmp_path / "rlhfkit-yaml-marker").exists()
