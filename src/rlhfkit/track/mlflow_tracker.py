"""MLflow: runs, params, metrics and artefacts through MlflowClient (no global active run is touched).

Where: `MLFLOW_TRACKING_URI` when set (a server, a database, a folder), else a file store in the run's folder
(`ROOT/mlruns`, `PIPELINE/mlruns` for a pipeline; `mlflow ui --backend-store-uri file:PIPELINE/mlruns` shows it).
MLflow 3 keeps the file store in maintenance mode and refuses it unless `MLFLOW_ALLOW_FILE_STORE=true`, which is
set for this process when the store is a file store. Experiment: `MLFLOW_EXPERIMENT_NAME`, else the pipeline's
name (or "rlhfkit"). A pipeline is one parent run; each stage is a child run (tag `mlflow.parentRunId`).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from rlhfkit.track.base import RunSpec, Tracker, flatten

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param's value
BATCH = 100              # params per log_batch call (MLflow's limit); metrics are far fewer than its 1000


def tracking_uri(root: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(root).resolve() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _key(name: str) -> str:
    """MLflow allows letters, digits and _ - . space : / in names."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class MLflowTracker(Tracker):
    name = "mlflow"
    nests_runs = True

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(spec.root))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"rlhfkit.stage": spec.stage}
        if spec.group is not None:
            tags["rlhfkit.group"] = spec.group
        if isinstance(spec.parent, MLflowTracker):
            tags["mlflow.parentRunId"] = spec.parent.run_id
        self.run_id = self.client.create_run(experiment_id, run_name=spec.name, tags=tags).info.run_id
        self.last_step = 0

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(_key(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + BATCH])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), v, now, step) for k, v in metrics.items()])
        self.last_step = max(self.last_step, step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics(self.last_step, metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, success: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if success else "FAILED")
