"""Run inside MLRun's own virtualenv (tests/mlrun/make_venv.sh) by test_mlrun.py: each check drives MLRun's
local runner, with no server, and prints one JSON line of what it observed for the test to assert on.

    python mlrun_checks.py spec|handler|workflow|failing OUT_DIR
"""

import base64
import json
import sys
from pathlib import Path

import mlrun

from rlhfkit.mlrun_functions import handlers
from rlhfkit.mlrun_functions.project import HERE, rlhf_project

TINY = {"sft": {"max_steps": 2}, "annotate": {"num_prompts": 8}, "reward": {"max_steps": 2},
        "ppo": {"max_steps": 1}, "eval": {"num_prompts": 4, "samples_per_prompt": 1, "best_of_n": 0,
                                          "benchmark": "lm-eval:rlhfkit_reply_choice", "benchmark_limit": 8}}


def spec(out: Path) -> dict:
    """function.yaml as MLRun's own loader reads it."""
    fn = mlrun.import_function(str(HERE / "function.yaml"))
    code = base64.b64decode(fn.spec.build.functionSourceCode).decode()
    return {"kind": fn.kind, "name": fn.metadata.name, "default_handler": fn.spec.default_handler,
            "handlers": sorted(fn.spec.entry_points),
            "ppo_parameters": {p["name"]: p.get("type") for p in fn.spec.entry_points["ppo"]["parameters"]},
            "code_is_handlers_py": code == Path(handlers.__file__).read_text()}


def handler(out: Path) -> dict:
    """One handler from the hub spec, with a data set as input, through fn.run(local=True)."""
    fn = mlrun.import_function(str(HERE / "function.yaml"))
    data = out / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": f"{w}!"}) + "\n" for w in "abcdefgh"))
    run = fn.run(handler="sft", params={"model": "tiny", "preset": "tiny", "settings": TINY["sft"]},
                 inputs={"train_data": str(data)}, local=True, output_path=str(out / "artifacts"))
    results = run.status.results
    model = out / "artifacts" / run.metadata.name / "0" / "model"
    return {"state": run.state(), "model_dir": results.get("model_dir"), "step": results.get("step"),
            "loss": results.get("train_loss", results.get("loss")),
            "artifact_files": sorted(p.name for p in model.iterdir()) if model.is_dir() else [],
            "config_data": (Path(results["model_dir"]) / "config.yaml").read_text() if "model_dir" in results else ""}


def workflow(out: Path, settings: dict | None = None) -> dict:
    """The SFT -> annotate -> reward -> PPO -> eval workflow on MLRun's local engine."""
    project = rlhf_project("rlhfkit-test", str(out / "project"))
    settings = settings or TINY
    arguments = {"model": "tiny", "preset": "tiny", **{f"{k}_settings": v for k, v in settings.items()}}
    arguments["eval_settings"] = settings["eval"]
    status = project.run("rlhf", engine="local", local=True, watch=True, arguments=arguments,
                         artifact_path=str(out / "artifacts"))
    stages = {p.name: p for p in (out / "artifacts" / "rlhfkit").glob("*/*")}  # rlhfkit/<run uid>/<stage>
    evals = [json.loads(p.read_text()) for p in sorted((out / "artifacts" / "rlhfkit").glob("*/eval/eval.json"))]
    return {"state": str(status.state), "stages": sorted(stages), "evals": evals,
            "models": {name: sorted(q.name for q in p.iterdir()) for name, p in stages.items() if name != "eval"}}


def failing(out: Path) -> dict:
    bad = dict(TINY, reward={"max_stepz": 2})
    return workflow(out, bad)


if __name__ == "__main__":
    check, where = sys.argv[1], Path(sys.argv[2])
    where.mkdir(parents=True, exist_ok=True)
    print("RESULT " + json.dumps(globals()[check](where), default=str))
