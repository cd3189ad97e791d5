"""TensorBoard: event files through torch.utils.tensorboard's SummaryWriter (needs the `tensorboard` package).

Files: `ROOT/tensorboard/` for a stage on its own, `PIPELINE/tensorboard/<stage>/` for a pipeline's stages (and
`.../pipeline/` for the pipeline's summary), so `tensorboard --logdir PIPELINE/tensorboard` shows them side by side.
TensorBoard keeps no files: the config and small text files (the model card, eval.json) become text entries.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rlhfkit.track.base import RunSpec, Tracker

TEXT_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".txt")
MAX_TEXT_BYTES = 64 * 1024


def log_dir(spec: RunSpec) -> Path:
    return spec.root / "tensorboard" / spec.name if spec.group is not None else spec.root / "tensorboard"


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir(spec)))
        self.last_step = 0

    def log_config(self, config: dict) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)  # markdown: keep the YAML's lines

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.last_step = max(self.last_step, step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics(self.last_step, metrics)

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.suffix in TEXT_SUFFIXES and path.stat().st_size <= MAX_TEXT_BYTES:
            body = path.read_text(encoding="utf-8", errors="replace")
            text = body if path.suffix == ".md" else "```\n" + body + "\n```"
            self.writer.add_text(f"files/{path.name}", text, self.last_step)

    def finish(self, success: bool = True) -> None:
        self.writer.flush()
        self.writer.close()
