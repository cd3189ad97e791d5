"""The tracking machinery with a recording tracker: what a stage sends, when its trackers open, and how a failed
stage ends its runs. The real trackers' libraries are exercised in test_trackers.py."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhfkit.config import TRACKERS
from rlhfkit.runtime.metrics_log import MetricsLog
from rlhfkit.track import stage as stage_module
from rlhfkit.track.base import Tracker, flatten, numbers
from rlhfkit.track.registry import TRACKERS as REGISTERED
from rlhfkit.track.stage import pipeline_tracking, stage_tracking, tracked


class Recorder(Tracker):
    opened: list["Recorder"] = []

    def __init__(self, spec):
        super().__init__(spec)
        self.events = []
        Recorder.opened.append(self)

    def log_config(self, config):
        self.events.append(("config", config))

    def log_metrics(self, step, metrics):
        self.events.append(("metrics", step, metrics))

    def log_summary(self, metrics):
        self.events.append(("summary", metrics))

    def log_artifact(self, path):
        self.events.append(("artifact", Path(path).name))

    def finish(self, success=True):
        self.events.append(("finish", success))


class NestingRecorder(Recorder):
    nests_runs = True


@dataclass
class FakeConfig:
    output_dir: str
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    learning_rate: float = 0.1


@pytest.fixture(autouse=True)
def recorder(monkeypatch):
    Recorder.opened = []
    monkeypatch.setattr(stage_module, "open_tracker", lambda name, spec: (NestingRecorder if name == "mlflow"
                                                                         else Recorder)(spec))
    monkeypatch.setattr(stage_module, "tracker_class", lambda name: NestingRecorder if name == "mlflow" else Recorder)
    return Recorder


def test_the_config_names_every_registered_tracker():
    assert tuple(REGISTERED) == TRACKERS


def test_a_stage_sends_its_rows_results_and_files(tmp_path):
    out = tmp_path / "ev"
    config = FakeConfig(str(out))

    @tracked("eval")
    def run(config):
        out.mkdir()
        log = MetricsLog(out / "metrics.jsonl")
        log.write({"step": 1, "loss": 2.0, "flag": True, "name": "x", "bad": float("nan")})
        MetricsLog(out / "samples.jsonl").write({"step": 1, "score": 5.0})  # not metrics.jsonl: not sent
        log.write({"step": 2, "loss": 1.5})
        (out / "eval.json").write_text(json.dumps({"gold_reward_mean": 0.25, "gold_reward_ci95": [0.1, 0.4],
                                                   "model": "m", "n": 8}))
        (out / "config.yaml").write_text("x: 1\n")
        return out

    assert run(config) == out
    (tracker,) = Recorder.opened
    assert tracker.spec.name == "ev" and tracker.spec.stage == "eval" and tracker.spec.root == out
    assert tracker.spec.group is None
    assert tracker.events == [
        ("config", {"output_dir": str(out), "report_to": ["tensorboard"], "learning_rate": 0.1}),
        ("metrics", 1, {"loss": 2.0}),
        ("metrics", 2, {"loss": 1.5}),
        ("summary", {"eval/gold_reward_mean": 0.25, "eval/gold_reward_ci95/low": 0.1,
                     "eval/gold_reward_ci95/high": 0.4, "eval/n": 8.0}),
        ("artifact", "config.yaml"), ("artifact", "metrics.jsonl"), ("artifact", "samples.jsonl"),
        ("artifact", "eval.json"),
        ("finish", True)]


def test_nothing_opens_for_a_stage_that_fails_before_its_first_row(tmp_path):
    @tracked("sft")
    def refuse(config):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        refuse(FakeConfig(str(tmp_path / "sft")))
    assert Recorder.opened == [] and not (tmp_path / "sft").exists()


def test_a_stage_that_fails_midway_ends_its_runs_as_failed(tmp_path):
    out = tmp_path / "sft"

    @tracked("sft")
    def crash(config):
        out.mkdir()
        MetricsLog(out / "metrics.jsonl").write({"step": 1, "loss": 3.0})
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        crash(FakeConfig(str(out), report_to=["tensorboard", "wandb"]))
    assert [t.events[-1] for t in Recorder.opened] == [("finish", False), ("finish", False)]
    assert all(("artifact", "metrics.jsonl") not in t.events for t in Recorder.opened)


def test_no_report_to_means_no_tracking(tmp_path):
    config = FakeConfig(str(tmp_path / "x"), report_to=[])
    with stage_tracking(config, "sft", tmp_path / "x") as tracking:
        assert tracking is None
    assert Recorder.opened == []


def test_a_pipeline_groups_its_stages(tmp_path):
    root = tmp_path / "demo"
    with pipeline_tracking(root, ["tensorboard", "mlflow"], {"seed": 0}) as group:
        for folder, stage in (("sft", "sft"), ("eval/sft", "eval")):
            out = root / folder
            out.mkdir(parents=True)
            with stage_tracking(FakeConfig(str(out), report_to=["tensorboard", "mlflow"]), stage, out):
                MetricsLog(out / "metrics.jsonl").write({"step": 1, "loss": 1.0})
        (root / "summary.json").write_text(json.dumps({
            "policies": {"sft": {"kl_exact_mean": 0.0, "gold_reward_mean": 0.1, "n": 4}},
            "checks": {"ppo_kl_within_budget": True}, "total_s": 12.0}))
        (root / "report.html").write_text("<html></html>")
    record = json.loads((root / "tracking.json").read_text())
    assert record["group"] == group.group and record["group"].startswith("demo-") and record["experiment"] == "demo"
    by_name = {(t.spec.name, type(t).__name__): t for t in Recorder.opened}
    # mlflow nests runs: its pipeline run opened first, the stages are its children; the others get theirs at the end
    mlflow_parent = by_name[("pipeline", "NestingRecorder")]
    assert by_name[("sft", "NestingRecorder")].spec.parent is mlflow_parent
    assert by_name[("eval-sft", "NestingRecorder")].spec.parent is mlflow_parent
    assert by_name[("sft", "Recorder")].spec.parent is None
    assert Recorder.opened.index(mlflow_parent) < Recorder.opened.index(by_name[("sft", "NestingRecorder")])
    for tracker in Recorder.opened:
        assert tracker.spec.group == group.group and tracker.spec.experiment == "demo" and tracker.spec.root == root
    for kind in ("Recorder", "NestingRecorder"):
        parent = by_name[("pipeline", kind)]
        assert parent.events[0] == ("config", {"seed": 0})
        assert ("summary", {"sft/kl_exact_mean": 0.0, "sft/gold_reward_mean": 0.1,
                            "checks/ppo_kl_within_budget": 1.0, "time/total_s": 12.0}) in parent.events
        assert [e[1] for e in parent.events if e[0] == "artifact"] == ["report.html", "summary.json"]
        assert parent.events[-1] == ("finish", True)
    # Run again (a resumed pipeline): the same group.
    with pipeline_tracking(root, ["tensorboard"], {}) as again:
        assert again.group == group.group


def test_numbers_and_flatten():
    assert numbers({"step": 3, "a": 1, "b": True, "c": None, "d": "x", "e": float("inf"), "f": 1e308}) == {"a": 1.0}
    assert flatten({"a": {"b": 1, "c": [1, 2, 3]}, "x_ci95": [0.1, 0.2]}) == {
        "a/b": 1, "a/c/0": 1, "a/c/1": 2, "a/c/2": 3, "x_ci95/low": 0.1, "x_ci95/high": 0.2}
