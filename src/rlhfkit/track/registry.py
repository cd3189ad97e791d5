"""Which trackers exist, which package each needs, and opening one (its library is imported only then)."""

from __future__ import annotations

import importlib
import importlib.util

from rlhfkit.errors import ConfigError
from rlhfkit.track.base import RunSpec, Tracker

# name -> (our module, its class, the package it imports, the extra that installs it)
TRACKERS: dict[str, tuple[str, str, str, str]] = {
    "tensorboard": ("rlhfkit.track.tensorboard_tracker", "TensorBoardTracker", "tensorboard", "tensorboard"),
    "mlflow": ("rlhfkit.track.mlflow_tracker", "MLflowTracker", "mlflow", "mlflow"),
    "wandb": ("rlhfkit.track.wandb_tracker", "WandbTracker", "wandb", "wandb"),
    "trackio": ("rlhfkit.track.trackio_tracker", "TrackioTracker", "trackio", "trackio"),
}


def check_installed(names: list[str]) -> None:
    """Refuse (one line, exit status 2 from the CLI) a tracker whose package is missing, before anything runs.
    Looks the package up without importing it."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"key 'report_to': {name!r} is not one of {', '.join(TRACKERS)}")
        package, extra = TRACKERS[name][2], TRACKERS[name][3]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to: {name} needs the '{package}' package, which is not installed: "
                              f"pip install \"rlhfkit[{extra}]\"")


def tracker_class(name: str) -> type[Tracker]:
    module, cls = TRACKERS[name][:2]
    return getattr(importlib.import_module(module), cls)


def open_tracker(name: str, spec: RunSpec) -> Tracker:
    return tracker_class(name)(spec)
