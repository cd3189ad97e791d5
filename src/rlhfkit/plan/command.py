"""`rlhfkit plan`: its own flags, then the stage config (built by the CLI, which owns config parsing) -> a report."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from rlhfkit.errors import UserError
from rlhfkit.plan.devices import parse_devices
from rlhfkit.plan.report import full_report, plan_json, render_text
from rlhfkit.plan.workload import TRAINING_STAGES, build_workload, knobs_from_config

PLAN_USAGE = """usage: rlhfkit plan (--config FILE.yaml | --preset NAME) [--stage STAGE] --devices LIST [--json]
                    [--layout single|spread|fsdp] [--frozen-half] [--offload-optimizer] [--key value ...]

Will it fit? Predicts each device's memory for a training stage (sft, reward, dpo, ppo, grpo, rloo) from the
models' config.json (no weights are read) and the stage's settings: where each model goes; per device and phase
(generate, score, train) the weights, gradients, optimizer state, activations (with and without gradient
checkpointing), KV cache and logits; whether it fits and which phase sets the peak; and, if it does not fit, the
smallest changes that would (checkpointing, a smaller micro-batch, half-precision frozen copies, LoRA, FSDP over
N devices, frozen models sharded too, CPU offload), each re-planned.

  --config FILE.yaml   a stage config (give --stage) or a pipeline file (every training stage in it is planned)
  --preset NAME        a built-in preset (tiny, demo, ...); with --stage
  --stage STAGE        which stage's settings to plan
  --devices LIST       e.g. 5xT4, 1xA100-80GB, 2xH100, 2xgpu:24GB, cpu:24GB
  --layout L           single: every model on one device (what rlhfkit runs); spread: one model per device;
                       fsdp: one process per device, trained models sharded over all (FSDP), frozen
                       ones whole on each, or sharded too with --fsdp-frozen shard (default: single)
  --frozen-half        what-if: frozen models (and a LoRA base) stored in fp16/bf16
  --offload-optimizer  what-if: optimizer state in host memory
  --json               the same result as JSON
  --key value          any field of the stage (e.g. --model phi-2 --lora-r 16 --gradient-checkpointing true);
                       --model also takes a known shape: phi-2, Llama-3.1-8B, Qwen2.5-0.5B/1.5B/7B,
                       SmolLM2-135M/360M/1.7B

Predictions are checked against measured peaks (bench/plan_check.py, tests/plan/)."""


@dataclass
class PlanArgs:
    devices: str | None = None
    stage: str | None = None
    config: str | None = None
    preset: str | None = None
    layout: str = "single"
    frozen_half: bool = False
    offload_optimizer: bool = False
    json: bool = False


_VALUED = {"--devices": "devices", "--stage": "stage", "--config": "config", "--preset": "preset",
           "--layout": "layout"}
_SWITCHES = {"--frozen-half": "frozen_half", "--offload-optimizer": "offload_optimizer", "--json": "json"}


def parse_plan_args(argv: list[str]) -> tuple[PlanArgs, list[str]]:
    """Plan's own flags; everything else is left for the stage config."""
    args, rest, i = PlanArgs(), [], 0
    while i < len(argv):
        token = argv[i]
        key, _, inline = token.partition("=")
        if key in _VALUED:
            if inline:
                value = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                raise UserError(f"{key} needs a value")
            setattr(args, _VALUED[key], value)
        elif key in _SWITCHES:
            setattr(args, _SWITCHES[key], inline.lower() not in ("false", "no", "0") if inline else True)
        else:
            rest.append(token)
        i += 1
    if args.layout not in ("single", "spread", "fsdp"):
        raise UserError(f"--layout: '{args.layout}' is not one of single, spread, fsdp")
    if args.stage is not None and args.stage not in TRAINING_STAGES:
        raise UserError(f"--stage: '{args.stage}' is not a training stage ({', '.join(TRAINING_STAGES)})")
    if args.devices is None:
        raise UserError("--devices is required, e.g. --devices 5xT4, 1xA100-80GB or cpu:24GB")
    if not args.config and not args.preset and not args.stage:
        raise UserError("give --config FILE.yaml, or --preset NAME with --stage STAGE")
    return args, rest


def is_pipeline_file(path: str) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # the stage config's own parser reports the problem
    return isinstance(data, dict) and ("stages" in data or any(isinstance(v, dict) for v in data.values()))


def run_plan_command(argv: list[str], stage_config: Callable, pipeline_configs: Callable) -> str:
    """The report (text or JSON) for `rlhfkit plan ARGS`. `stage_config(stage, config_file, preset, flags)` and
    `pipeline_configs(path)` (-> {stage: config}) come from the CLI."""
    args, rest = parse_plan_args(argv)
    devices = parse_devices(args.devices)
    if args.config and is_pipeline_file(args.config):
        if rest:
            raise UserError(f"with a pipeline file, set stage fields in its sections, not as flags ({rest[0]})")
        configs = {s: c for s, c in pipeline_configs(args.config).items() if s in TRAINING_STAGES}
        if args.stage:
            configs = {args.stage: configs[args.stage]} if args.stage in configs else {}
        if not configs:
            raise UserError(f"{args.config}: no training stage to plan")
    else:
        if not args.stage:
            raise UserError("--stage is required with a stage config or a preset (sft, reward, dpo, ppo, grpo, rloo)")
        configs = {args.stage: stage_config(args.stage, args.config, args.preset, rest)}
    texts, payload = [], {}
    for stage, config in configs.items():
        knobs = replace(knobs_from_config(stage, config), layout=args.layout, frozen_half=args.frozen_half,
                        offload_optimizer=args.offload_optimizer)
        workload = build_workload(stage, config, knobs)
        plan, suggestions, others = full_report(workload, devices)
        payload[stage] = plan_json(plan, suggestions, others)
        texts.append(render_text(plan, suggestions, others))
    if args.json:
        return json.dumps(payload if len(payload) > 1 else next(iter(payload.values())), indent=2)
    return "\n\n".join(texts)
