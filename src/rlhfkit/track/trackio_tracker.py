"""Trackio (Hugging Face's local-first tracker): a local SQLite database per project, `trackio show` to see it.

Where: `TRACKIO_DIR` when set (read by trackio when it is first imported), else trackio's own default
(`~/.cache/huggingface/trackio`). Project: the pipeline's name (or "rlhfkit"), with a pipeline's stages in one group.
Nothing leaves the machine unless trackio is told to (`TRACKIO_SPACE_ID`, `TRACKIO_SERVER_URL`).
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhfkit.track.base import RunSpec, Tracker

ARTIFACT_TYPES = {"annotate": "dataset", "eval": "evaluation", "pipeline": "report"}  # else "model"


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        self.run = None  # trackio takes the config at init: the run starts in log_config (or the first log)
        self.last_step = 0

    def _start(self, config: dict | None = None):
        if self.run is None:
            import trackio

            self.run = trackio.init(project=self.spec.experiment, name=self.spec.name, group=self.spec.group,
                                    config=config, embed=False, auto_log_cpu=False, auto_log_gpu=False)
        return self.run

    def log_config(self, config: dict) -> None:
        self._start(config)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._start().log(metrics, step=step)
        self.last_step = max(self.last_step, step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics(self.last_step, metrics)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        group = f"{self.spec.group}-" if self.spec.group else ""
        name = re.sub(r"[^\w\-.]", "_", f"{group}{self.spec.name}-{path.name}")
        self._start().log_artifact(str(path), name=name,
                                   type=ARTIFACT_TYPES.get(self.spec.stage, "model"))

    def finish(self, success: bool = True) -> None:
        if self.run is None:
            return
        import trackio
        from trackio import context_vars

        if context_vars.current_run.get() is self.run:
            trackio.finish()  # also clears trackio's current run, so the next init starts clean
        else:
            self.run.finish()
