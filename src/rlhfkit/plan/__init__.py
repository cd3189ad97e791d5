"""The memory planner behind `rlhfkit plan`: model shapes -> bytes per device and phase, fits or not, what to change.

shapes.py (config.json or named facts) -> workload.py (a stage's config: weight sets, roles, batch shapes)
-> memory.py (bytes of each kind, from first principles) -> layout.py (placement, phases, fit, suggestions)
-> report.py (text and JSON). Nothing here loads weights or imports torch.
"""

from __future__ import annotations

from rlhfkit.plan.devices import Device, parse_devices
from rlhfkit.plan.layout import Plan, plan
from rlhfkit.plan.suggest import Suggestion, suggest
from rlhfkit.plan.report import full_report, plan_json, render_text
from rlhfkit.plan.shapes import ModelShape, resolve_shape
from rlhfkit.plan.workload import Knobs, Workload, build_workload

__all__ = ["Device", "Knobs", "ModelShape", "Plan", "Suggestion", "Workload", "build_workload", "full_report",
           "parse_devices", "plan", "plan_json", "render_text", "resolve_shape", "suggest"]
