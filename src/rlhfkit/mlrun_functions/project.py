"""An MLRun project with the `rlhfkit` function (from function.yaml, as a hub lists it) and the `rlhf` workflow."""

from __future__ import annotations

from pathlib import Path

import mlrun

HERE = Path(__file__).parent


def rlhf_project(name: str = "rlhfkit", context: str = "./") -> mlrun.projects.MlrunProject:
    """A project in the folder `context` (created if new), with the function and the workflow registered."""
    project = mlrun.get_or_create_project(name, context=context, allow_cross_project=True, save=False)
    project.set_function(str(HERE / "function.yaml"), name="rlhfkit")
    project.set_workflow("rlhf", str(HERE / "workflow.py"))
    return project
