"""rlhfkit's stages as MLRun functions, run by MLRun's own local runner with no server.

MLRun lives in a virtualenv of its own (its pins clash with ours: tests/mlrun/make_venv.sh, which the README's
test command runs); each check runs there (mlrun_checks.py) and prints what it saw, asserted on here.
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ROOT / "src" / "rlhfkit" / "mlrun_functions"
MLRUN_PYTHON = Path(os.environ.get("RLHFKIT_MLRUN_PYTHON") or ROOT / ".venv-mlrun" / "bin" / "python")

needs_mlrun = pytest.mark.skipif(not MLRUN_PYTHON.exists(), reason=f"no MLRun virtualenv at {MLRUN_PYTHON}: "
                                 "bash tests/mlrun/make_venv.sh (the README's test command makes it)")


def in_mlrun(check: str, tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("MLRUN_DBPATH", None)  # no server
    done = subprocess.run([str(MLRUN_PYTHON), str(Path(__file__).parent / "mlrun_checks.py"), check, str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{check}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_function_yaml_holds_handlers_py_as_it_is_and_item_yaml_agrees():
    """function.yaml embeds handlers.py (export.py writes it): a change to the handlers needs a new export."""
    spec = yaml.safe_load((FUNCTIONS / "function.yaml").read_text())
    code = base64.b64decode(spec["spec"]["build"]["functionSourceCode"]).decode()
    assert code == (FUNCTIONS / "handlers.py").read_text(), "run: python -m rlhfkit.mlrun_functions.export"
    item = yaml.safe_load((FUNCTIONS / "item.yaml").read_text())
    assert (item["name"], item["spec"]["kind"], item["spec"]["image"], item["spec"]["handler"]) == (
        spec["metadata"]["name"], spec["kind"], spec["spec"]["build"]["base_image"], spec["spec"]["default_handler"])
    assert set(spec["spec"]["entry_points"]) == {"sft", "annotate", "reward", "ppo", "grpo", "dpo", "evaluate"}


@needs_mlrun
def test_mlruns_loader_reads_the_function_spec_with_typed_parameters(tmp_path):
    seen = in_mlrun("spec", tmp_path)
    assert (seen["kind"], seen["name"], seen["default_handler"]) == ("job", "rlhfkit", "sft")
    assert seen["handlers"] == ["annotate", "dpo", "evaluate", "grpo", "ppo", "reward", "sft"]
    assert seen["ppo_parameters"] == {"context": "MLClientCtx", "model": "str", "reward_model": "str",
                                      "prompts": "DataItem", "settings": "dict", "preset": "str"}
    assert seen["code_is_handlers_py"]


@needs_mlrun
def test_a_handler_runs_locally_with_a_data_set_in_and_a_model_artifact_out(tmp_path):
    seen = in_mlrun("handler", tmp_path)
    assert seen["state"] == "completed" and seen["step"] == 2 and seen["loss"] > 0
    # The input data set reached the stage, and its model folder was logged whole as a model artifact.
    assert f"data: {tmp_path / 'sft.jsonl'}" in seen["config_data"] and "max_steps: 2" in seen["config_data"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "model_spec.yaml"} <= \
        set(seen["artifact_files"])


@needs_mlrun
def test_the_workflow_runs_sft_annotate_reward_ppo_and_eval_on_the_local_engine(tmp_path):
    seen = in_mlrun("workflow", tmp_path)
    assert seen["state"] == "Succeeded"
    assert seen["stages"] == ["annotate", "eval", "ppo", "reward", "sft"]
    for stage in ("sft", "reward", "ppo"):
        assert "model.safetensors" in seen["models"][stage] and "README.md" in seen["models"][stage], stage
    assert "preferences.jsonl" in seen["models"]["annotate"]
    # Two evaluations (SFT and PPO), each against the SFT model, with the benchmark before and after.
    assert len(seen["evals"]) == 2
    sft_dir = next(ev["model"] for ev in seen["evals"] if ev["model"] == ev["ref_model"])
    assert all(ev["ref_model"] == sft_dir and ev["n_prompts"] == 4 for ev in seen["evals"])
    ppo = next(ev for ev in seen["evals"] if ev["model"] != sft_dir)
    assert ppo["model"].endswith("/ppo") and ppo["kl_exact_mean"] > 0
    assert ppo["benchmark"]["tasks"]["rlhfkit_reply_choice"]["n"] == 8


@needs_mlrun
def test_a_failing_step_ends_the_workflow_failed_instead_of_waiting_for_it(tmp_path):
    seen = in_mlrun("failing", tmp_path)  # reward's settings have a misspelt key
    assert seen["state"] == "Failed" and seen["stages"] == ["annotate", "sft"] and seen["evals"] == []
