"""A pipeline's stages as one group in every tracker, read back from the files the trackers wrote; and the model
card of a trained policy, given its evaluation once the pipeline has run it."""

import json

import pytest

from rlhfkit.cli import main

from .test_trackers import key, wandb_records


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'rlhfkit[mlflow]'")
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'rlhfkit[wandb]'")
    tmp = tmp_path_factory.mktemp("group")
    out = tmp / "demo"
    path = tmp / "pipeline.yaml"
    path.write_text(f"""output_dir: {out}
model: tiny
mixed_precision: 'no'
report_to: [tensorboard, mlflow, wandb]
stages: [sft, eval]
sft: {{max_samples: 32, max_steps: 2, batch_size: 4, max_prompt_length: 32, max_length: 64, eval_every: 0,
      eval_batches: 1, save_every: 0, progress: false}}
eval: {{num_prompts: 3, samples_per_prompt: 2, max_new_tokens: 6, max_prompt_length: 32, max_length: 64,
       progress: false}}
""")
    env = {"WANDB_API_KEY": None, "WANDB_MODE": None, "WANDB_DIR": None, "WANDB_PROJECT": None,
           "MLFLOW_TRACKING_URI": None, "MLFLOW_EXPERIMENT_NAME": None, "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_CONFIG_DIR": str(tmp / "wandb-config")}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.delenv(name, raising=False) if value is None else mp.setenv(name, value)
        assert main(["pipeline", str(path)]) == 0
    return out


def test_tensorboard_has_one_folder_per_stage_and_one_for_the_pipeline(pipeline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted(p.name for p in (pipeline_run / "tensorboard").iterdir())
    assert folders == ["eval-sft", "pipeline", "sft"]
    scalars = {}
    for name in folders:
        events = EventAccumulator(str(pipeline_run / "tensorboard" / name), size_guidance={"scalars": 0})
        events.Reload()
        scalars[name] = events.Tags()["scalars"]
    assert "loss" in scalars["sft"]
    assert {"eval/gold_reward_mean", "eval/kl_exact_mean", "eval/kl_to_reference_mean"} <= set(scalars["eval-sft"])
    assert {"sft/gold_reward_mean", "sft/kl_exact_mean", "time/total_s"} <= set(scalars["pipeline"])


def test_mlflow_nests_the_stages_under_the_pipelines_run(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(pipeline_run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pipeline", "sft", "eval-sft"}
    parent = runs["pipeline"].info.run_id
    group = json.loads((pipeline_run / "tracking.json").read_text())["group"]
    for name in ("sft", "eval-sft"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent and runs[name].info.status == "FINISHED"
        assert runs[name].data.tags["rlhfkit.group"] == group
    evaluation = json.loads((pipeline_run / "eval" / "sft" / "eval.json").read_text())
    assert runs["eval-sft"].data.metrics["eval/gold_reward_mean"] == pytest.approx(evaluation["gold_reward_mean"])
    assert runs["pipeline"].data.metrics["sft/gold_reward_mean"] == pytest.approx(evaluation["gold_reward_mean"])
    assert {"report.html", "summary.json"} <= {a.path for a in client.list_artifacts(parent)}
    assert {"eval.json", "samples.jsonl"} <= {a.path for a in client.list_artifacts(runs["eval-sft"].info.run_id)}


def test_wandb_runs_share_the_pipelines_group(pipeline_run):
    group = json.loads((pipeline_run / "tracking.json").read_text())["group"]
    runs = {}
    for folder in (pipeline_run / "wandb").glob("offline-run-*"):
        records = wandb_records(next(folder.glob("run-*.wandb")))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        summary = {key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                   for i in r.summary.update}
        runs[run.display_name] = (run, summary)
    assert set(runs) == {"sft", "eval-sft", "pipeline"}
    assert {run.run_group for run, _ in runs.values()} == {group}
    assert {name: run.job_type for name, (run, _) in runs.items()} == {"sft": "sft", "eval-sft": "eval",
                                                                       "pipeline": "pipeline"}
    assert {run.project for run, _ in runs.values()} == {"demo"}
    evaluation = json.loads((pipeline_run / "eval" / "sft" / "eval.json").read_text())
    assert runs["eval-sft"][1]["eval/kl_exact_mean"] == evaluation["kl_exact_mean"] == 0.0


def test_the_trained_policys_model_card_gets_its_evaluation(pipeline_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(pipeline_run / "sft" / "README.md")
    evaluation = json.loads((pipeline_run / "eval" / "sft" / "eval.json").read_text())
    assert card.data.library_name == "transformers" and card.data.tags == ["rlhfkit", "sft"]
    found = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert found["gold_reward"] == pytest.approx(evaluation["gold_reward_mean"], abs=1e-6)
    assert found["kl_exact"] == 0.0 and found["win_rate_vs_reference"] == pytest.approx(
        evaluation["win_rate_vs_reference_mean"], abs=1e-6)
    assert "## Evaluation" in card.text and "max_steps: 2" in card.text
