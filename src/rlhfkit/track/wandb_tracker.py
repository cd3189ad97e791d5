"""Weights & Biases through `wandb`: offline unless a key is set.

Mode: `WANDB_MODE` when set, else "online" with `WANDB_API_KEY` and "offline" without it (the run is kept in
`wandb/offline-run-*` and can be uploaded later with `wandb sync`). Folder: `WANDB_DIR` when set, else the run's
folder (the pipeline's for its stages). Project: `WANDB_PROJECT`, else the pipeline's name (or "rlhfkit"); a
pipeline's stages share one `group`, with the stage as `job_type`. Final files go into one artifact per run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlhfkit.track.base import RunSpec, Tracker

ARTIFACT_TYPES = {"annotate": "dataset", "eval": "evaluation", "pipeline": "report"}  # else "model"


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        import wandb

        self._wandb = wandb
        folder = Path(os.environ.get("WANDB_DIR") or spec.root)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or spec.experiment, group=spec.group,
                              name=spec.name, job_type=spec.stage, dir=str(folder), mode=wandb_mode(),
                              reinit="create_new", settings=wandb.Settings(console="off"))
        self.files: list[Path] = []

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)  # steps must grow in wandb's history; results belong in the summary

    def log_artifact(self, path: Path) -> None:
        self.files.append(Path(path))

    def finish(self, success: bool = True) -> None:
        try:
            if self.files and success:
                group = f"{self.spec.group}-" if self.spec.group else ""
                name = re.sub(r"[^\w\-.]", "_", f"{group}{self.spec.name}")
                artifact = self._wandb.Artifact(name, type=ARTIFACT_TYPES.get(self.spec.stage, "model"))
                for path in self.files:
                    artifact.add_file(str(path), name=path.name)
                self.run.log_artifact(artifact)
        finally:
            self.run.finish(exit_code=0 if success else 1)
