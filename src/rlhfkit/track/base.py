"""The interface every tracker implements, and what a tracker is told about the run it records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunSpec:
    """One run of a tracker: a stage, or a pipeline's own run that groups its stages."""

    name: str                  # the run's name: "sft", "eval-ppo", ...; "pipeline" for a pipeline's own run
    stage: str                 # "sft", "reward", "dpo", "ppo", "grpo", "rloo", "annotate", "eval" or "pipeline"
    root: Path                 # the folder for the tracker's local files: the stage's output folder, or the
                               # pipeline's when the stage is part of one
    experiment: str = "rlhfkit"  # mlflow experiment, wandb and trackio project
    group: str | None = None   # the pipeline's group (wandb group, trackio group, mlflow parent run name); None alone
    parent: "Tracker | None" = None  # the pipeline's run in the same tracker, where the tracker nests runs (mlflow)


class Tracker:
    """What a stage sends to an experiment tracker. Each method is called from the training process only."""

    name = "tracker"
    nests_runs = False  # True: a pipeline's own run is opened first and its stages are its child runs (mlflow)

    def __init__(self, spec: RunSpec):
        self.spec = spec

    def log_config(self, config: dict) -> None:
        """The stage's resolved config (as config.yaml holds it), once, before any metric."""
        raise NotImplementedError

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One row of metrics.jsonl: finite numbers only, keyed as there (`loss`, `objective/kl`, ...)."""
        raise NotImplementedError

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Results of the whole run (eval.json's numbers, annotate's summary, a pipeline's checks): by default
        logged as metrics at step 0; trackers with a run summary put them there."""
        self.log_metrics(0, metrics)

    def log_artifact(self, path: Path) -> None:
        """A final file of the stage (config.yaml, metrics.jsonl, README.md, eval.json, report.html, ...)."""
        raise NotImplementedError

    def finish(self, success: bool = True) -> None:
        """Close the run (failed when the stage raised)."""
        raise NotImplementedError


def numbers(row: dict, skip: tuple[str, ...] = ("step",)) -> dict[str, float]:
    """The finite numbers of a row (bools and nested values dropped), as floats."""
    out = {}
    for key, value in row.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value) and abs(value) < 1e308:  # metrics.jsonl writes +-inf as +-1e308
            out[key] = float(value)
    return out


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a/b": 1}; lists of numbers -> "key/0", "key/1" (e.g. a 95% interval)."""
    out: dict = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            ends = ("low", "high") if len(value) == 2 and key.endswith("ci95") else range(len(value))
            out.update({f"{name}/{end}": v for end, v in zip(ends, value)})
        else:
            out[name] = value
    return out
