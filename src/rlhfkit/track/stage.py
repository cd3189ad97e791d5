"""Tracking a stage (`tracked`), and a pipeline's stages as one group (`pipeline_tracking`).

A tracked stage opens its trackers when it logs its first metrics row (or, for a stage without steps, when it
finishes): a stage that refuses its input before writing anything leaves no tracker run behind, as it leaves no
folder. The rows come from `runtime.metrics_log` (every MetricsLog row is passed on), so every stage that writes
metrics.jsonl is tracked with no code of its own; at the end the stage's results (eval.json, annotate's
summary.json) go to the run's summary and its final files (not the weights) are logged as artefacts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

from rlhfkit.runtime.distributed import processes
from rlhfkit.runtime.metrics_log import listening
from rlhfkit.track.base import RunSpec, Tracker, flatten, numbers
from rlhfkit.track.registry import open_tracker, tracker_class

# The small final files of a stage, logged as artefacts when present. The weights stay in the output folder:
# trackers would copy them for every stage (about 0.5 GB each for the embedded model).
ARTEFACTS = ("config.yaml", "README.md", "metrics.jsonl", "samples.jsonl", "eval.json", "reference.json",
             "summary.json", "rankings.jsonl", "preferences.jsonl")
# A stage's results file, whose numbers become the run's summary (prefixed with the stage).
RESULTS = {"eval": "eval.json", "annotate": "summary.json"}
PIPELINE_FILES = ("report.html", "summary.json", "timings.json")


def _read_numbers(path: Path, prefix: str) -> dict[str, float]:
    if not path.is_file():
        return {}
    return {f"{prefix}/{k}": v for k, v in numbers(flatten(json.loads(path.read_text()))).items()}


def _finish_all(trackers: list[Tracker], success: bool) -> None:
    """Finish every tracker; on a failed stage a tracker that cannot finish must not hide the stage's error."""
    for tracker in trackers:
        try:
            tracker.finish(success)
        except Exception:
            if success:
                raise


class PipelineGroup:
    """The trackers' view of a pipeline: its folder, the group's name (kept in `tracking.json`, so a pipeline run
    again continues the same group) and the pipeline's own run in each tracker (a parent run where the tracker
    nests runs, opened before the first stage; elsewhere opened at the end, for the report and the checks)."""

    def __init__(self, root: Path, names: list[str], settings: dict):
        self.root, self.names, self.settings = Path(root), list(names), settings
        self.experiment = self.root.resolve().name or "rlhfkit"
        self.parents: dict[str, Tracker] = {}
        self._group: str | None = None

    @property
    def group(self) -> str:
        if self._group is None:
            record = self.root / "tracking.json"
            if record.is_file():
                self._group = json.loads(record.read_text())["group"]
            else:
                self._group = f"{self.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.root.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"group": self._group, "experiment": self.experiment}, indent=2))
        return self._group

    def parent(self, name: str) -> Tracker:
        if name not in self.parents:
            spec = RunSpec("pipeline", "pipeline", self.root, self.experiment, self.group)
            self.parents[name] = open_tracker(name, spec)
            self.parents[name].log_config(self.settings)
        return self.parents[name]

    def spec_for(self, name: str, stage: str, out: Path) -> RunSpec:
        """A stage's run: named after its folder inside the pipeline's ("sft", "eval-ppo")."""
        try:
            run_name = "-".join(out.resolve().relative_to(self.root.resolve()).parts) or stage
        except ValueError:  # a section put the stage's output elsewhere
            run_name = out.name
        parent = self.parent(name) if tracker_class(name).nests_runs else None
        return RunSpec(run_name, stage, self.root, self.experiment, self.group, parent)

    def close(self, success: bool) -> None:
        """Log the pipeline's results (every policy's evaluation means, the checks) and report to its own run."""
        if success:
            summary = self.root / "summary.json"
            results: dict[str, float] = {}
            if summary.is_file():
                data = json.loads(summary.read_text())
                for policy, ev in (data.get("policies") or {}).items():
                    results.update({f"{policy}/{k}": v for k, v in numbers(ev).items() if k.endswith("_mean")})
                results.update({f"checks/{k}": float(v) for k, v in (data.get("checks") or {}).items()})
                if "total_s" in data:
                    results["time/total_s"] = float(data["total_s"])
            for name in self.names:
                tracker = self.parent(name)
                if results:
                    tracker.log_summary(results)
                for file in PIPELINE_FILES:
                    if (self.root / file).is_file():
                        tracker.log_artifact(self.root / file)
        _finish_all(list(self.parents.values()), success)


_GROUP: ContextVar[PipelineGroup | None] = ContextVar("rlhfkit_pipeline_group", default=None)


class StageTracking:
    """The trackers of one stage run: opened on first use, fed every row of OUT/metrics.jsonl."""

    def __init__(self, config, stage: str, out: Path):
        self.config, self.stage, self.out = config, stage, Path(out)
        self.names = list(config.report_to)
        self.group = _GROUP.get()
        self.trackers: list[Tracker] | None = None
        self.metrics_file = (self.out / "metrics.jsonl").resolve()

    def open(self) -> list[Tracker]:
        if self.trackers is None:
            self.trackers = []
            config = dataclasses.asdict(self.config)
            for name in self.names:
                spec = self.group.spec_for(name, self.stage, self.out) if self.group is not None else \
                    RunSpec(self.out.resolve().name or self.stage, self.stage, self.out)
                tracker = open_tracker(name, spec)
                self.trackers.append(tracker)
                tracker.log_config(config)
        return self.trackers

    def on_row(self, path: Path, row: dict) -> None:
        if Path(path).resolve() != self.metrics_file:
            return  # samples.jsonl, or another stage's log
        metrics = numbers(row)
        if metrics:
            for tracker in self.open():
                tracker.log_metrics(int(row.get("step", 0)), metrics)

    def close(self, success: bool) -> None:
        if success:
            results = _read_numbers(self.out / RESULTS[self.stage], self.stage) if self.stage in RESULTS else {}
            for tracker in self.open():
                if results:
                    tracker.log_summary(results)
                for name in ARTEFACTS:
                    if (self.out / name).is_file():
                        tracker.log_artifact(self.out / name)
        _finish_all(self.trackers or [], success)


@contextmanager
def stage_tracking(config, stage: str, out: Path) -> Iterator[StageTracking | None]:
    """Track the stage run inside the block in every tracker of `config.report_to` (none: nothing happens)."""
    if not getattr(config, "report_to", None):
        yield None
        return
    tracking = StageTracking(config, stage, out)
    try:
        with listening(tracking.on_row):
            yield tracking
    except BaseException:
        tracking.close(success=False)
        raise
    tracking.close(success=True)


def tracked(stage: str) -> Callable:
    """Decorator of a stage's entry point `run(config) -> Path`: tracks it (see `stage_tracking`). The output
    folder is the one every stage resolves, `config.output_dir` or `runs/<stage>`."""
    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def run_tracked(config):
            # Several processes (torchrun): the main one tracks, as it alone writes files.
            if not getattr(config, "report_to", None) or not processes().main:
                return run(config)
            with stage_tracking(config, stage, Path(config.output_dir or f"runs/{stage}")):
                return run(config)
        return run_tracked
    return wrap


@contextmanager
def pipeline_tracking(root: Path, names: list[str], settings: dict) -> Iterator[PipelineGroup | None]:
    """Inside the block, tracked stages form one group: one experiment / project named after the pipeline's folder,
    one group per pipeline (wandb `group`, trackio group, an mlflow parent run with the stages as child runs,
    tensorboard sub-folders per stage), and the pipeline's own run gets its report and checks at the end."""
    if not names:
        yield None
        return
    group = PipelineGroup(root, names, settings)
    token = _GROUP.set(group)
    try:
        yield group
    except BaseException:
        _GROUP.reset(token)
        group.close(success=False)
        raise
    _GROUP.reset(token)
    group.close(success=True)
