"""The `rlhfkit` command: `rlhfkit <stage> [--config FILE.yaml] [--preset NAME] [--key value ...]`.

A user's mistake (bad flag, bad file, bad record) is one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import os
import sys
import time

from rlhfkit.errors import UserError
from rlhfkit.host_memory import keep_freed_memory
from rlhfkit.runtime.interrupt import TrainingStopped

USAGE = """usage: rlhfkit <stage> [--config FILE.yaml] [--preset NAME] [--key value ...]

stages:
  sft        supervised fine-tuning on prompt/completion data (default: the embedded chatterbot corpus)
  annotate   sample K responses per prompt and rank them with a simulated annotator -> preference pairs
             (`--annotator human`: write a labelling project for people instead, see `rlhfkit label`)
  reward     train a reward model (LM trunk + scalar head) with the Bradley-Terry loss
  ppo        fine-tune the policy with PPO against the reward model, KL-penalised to a reference
  dpo        fine-tune the policy directly on preference pairs (DPO, cDPO, IPO): no reward model, no sampling
  grpo       GRPO: K samples per prompt, group-relative advantages, no critic; rewards from a reward model
             and/or Python functions (--reward-function module:function, e.g. verifiable rewards)
  rloo       RLOO: REINFORCE with a leave-one-out baseline over K samples per prompt, KL in the reward
  eval       sample on held-out prompts: gold and proxy reward, KL to the reference, win rate -> eval.json
  pipeline   all of the above from one YAML file, then report.html and summary.json
  label      people rank the responses: add-annotator, serve (a web app), export (-> preference pairs)
  demo       the pipeline on the embedded default (`--preset tiny`: a tiny model, about a minute;
             `--algos ppo,dpo,grpo`: compare fine-tuning methods)
  plan       will it fit? memory per device and phase for a stage on given devices, and what to change
             (`rlhfkit plan --preset tiny --stage ppo --model phi-2 --devices 5xT4`; `--help` for more)

Every config field is a flag (--output-dir DIR, --data PATH, --model PATH, ...); `rlhfkit <stage> --help`
lists them with their help. Precedence: defaults < --preset < --config < flags."""


# stage -> (module, function). Imported lazily: `rlhfkit --help` should not pay for torch and transformers.
RUNNERS = {
    "sft": ("rlhfkit.trainers.sft", "run_sft"),
    "annotate": ("rlhfkit.annotate.stage", "run_annotate"),
    "reward": ("rlhfkit.trainers.reward", "run_reward"),
    "ppo": ("rlhfkit.trainers.ppo", "run_ppo"),
    "dpo": ("rlhfkit.trainers.dpo", "run_dpo"),
    "grpo": ("rlhfkit.trainers.grpo", "run_grpo"),
    "rloo": ("rlhfkit.trainers.grpo", "run_rloo"),
    "eval": ("rlhfkit.eval.evaluate", "run_eval"),
}


def runner(stage: str):
    import importlib

    module, function = RUNNERS[stage]
    return getattr(importlib.import_module(module), function)


def quiet_transformers() -> None:
    """Our own progress bar and messages are enough; transformers' per-load bars and notes are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


PIPELINE_USAGE = """usage: rlhfkit pipeline FILE.yaml [--output-dir DIR] [--seed N] [--model PATH] [--device auto|cpu|cuda|cuda:N|mps] [--mixed-precision auto|no|bf16|fp16]
                        [--algos ppo,dpo,grpo,rloo] [--report-to tensorboard,mlflow,wandb,trackio] [--lora-r N]
       rlhfkit demo [--preset tiny|lora] [--output-dir DIR] [--seed N] [--device auto|cpu|cuda:N] [--mixed-precision auto|no|bf16|fp16] [--algos ...]
                    [--report-to ...] [--lora-r N]

Runs sft -> annotate -> reward -> ppo -> eval (of the starting and the trained policy) -> report.html.
`--algos ppo,dpo,grpo` runs those fine-tuning stages instead (DPO on the annotated preferences, GRPO and RLOO
against the reward model) and evaluates each on the same held-out prompts: the report puts them in one table
and on one gold-vs-KL plot. `demo` runs the packaged pipeline on the embedded default (SmolLM2-135M-Instruct,
chatterbot prompts, VADER as the gold judge); `--preset tiny` runs the same recipe on a tiny random model in
about a minute; `--preset lora` runs it with LoRA adapters (rank 16) in every trained stage, at learning rates
for adapters. `--lora-r N` gives every trained stage that rank (with the file's learning rates). A pipeline
file may start from another with `extends: demo` (a packaged one) or `extends: base.yaml`. A finished stage is
skipped when the same command is run again, so an interrupted pipeline continues (and `--algos` on a finished
demo runs only the new stages)."""


def run_stage(stage: str, rest: list[str]):
    from rlhfkit.config import STAGES
    from rlhfkit.config_parsing import build_config, flags_help, parse_flags

    prog = f"rlhfkit {stage}"
    if "-h" in rest or "--help" in rest:
        print(f"usage: {prog} [--config FILE.yaml] [--preset NAME] [--key value ...]\n\n"
              f"{STAGES[stage].__doc__.strip()}\n\n{flags_help(STAGES[stage], prog)}")
        return None
    sources, flags = parse_flags(STAGES[stage], rest, prog)
    config = build_config(stage, sources.config, sources.preset, flags)
    quiet_transformers()
    return runner(stage)(config)


def run_pipeline_command(command: str, rest: list[str]):
    from rlhfkit.config import PipelineSettings
    from rlhfkit.config_parsing import parse_flags
    from rlhfkit.pipeline import demo_path, load_pipeline, run_pipeline

    if "-h" in rest or "--help" in rest:
        print(PIPELINE_USAGE)
        return None
    from rlhfkit.runtime.distributed import one_process_only

    one_process_only(command)  # its stages would each run N times over
    if command == "pipeline":
        if not rest or rest[0].startswith("--"):
            raise UserError("pipeline needs a YAML file: rlhfkit pipeline FILE.yaml")
        config_file, rest = rest[0], rest[1:]
    sources, flags = parse_flags(PipelineSettings, rest, f"rlhfkit {command}")
    if command == "demo":
        config_file = demo_path(sources.preset)
    elif sources.preset or sources.config:
        raise UserError("pipeline takes its settings from FILE.yaml (no --config or --preset)")
    pipe = load_pipeline(config_file, flags)
    quiet_transformers()
    return run_pipeline(pipe, runner)


def run_plan(rest: list[str]) -> None:
    """`rlhfkit plan`: the planner (rlhfkit/plan/) reads the configs this module knows how to build."""
    from rlhfkit.config import STAGES
    from rlhfkit.config_parsing import build_config, parse_flags
    from rlhfkit.pipeline import load_pipeline, stage_config
    from rlhfkit.plan.command import PLAN_USAGE, run_plan_command

    if "-h" in rest or "--help" in rest:
        print(PLAN_USAGE)
        return

    def from_flags(stage, config_file, preset, flags):
        return build_config(stage, config_file, preset, parse_flags(STAGES[stage], flags, "rlhfkit plan")[1])

    def from_pipeline(path):
        pipe = load_pipeline(path)
        return {stage: stage_config(pipe, stage, {}) for stage in pipe.stages}

    print(run_plan_command(rest, from_flags, from_pipeline))


def main(argv: list[str] | None = None) -> int:
    from rlhfkit.config import STAGES

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in STAGES and command not in ("pipeline", "demo", "label", "plan"):
        choices = ", ".join([*STAGES, "pipeline", "demo", "label", "plan"])
        print(f"rlhfkit: error: unknown command '{command}' (choose from {choices})", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()  # large tensors are reused, not page-faulted in again at every step (host_memory.py)
    started = time.perf_counter()
    try:
        if command == "plan":
            run_plan(rest)
            return 0
        if command == "label":
            from rlhfkit.label.commands import main as label_main

            return label_main(rest)
        if command in STAGES:
            out = run_stage(command, rest)
        else:
            out = run_pipeline_command(command, rest)
    except UserError as exc:
        print(f"rlhfkit {command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"rlhfkit {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rlhfkit {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "rlhfkit.runtime.distributed" in sys.modules:  # a stage ran: leave its process group, if any
            sys.modules["rlhfkit.runtime.distributed"].finish_processes()
    from rlhfkit.runtime.distributed import processes

    if out is not None and processes().main:  # under a launcher, the process that wrote it says so
        print(f"rlhfkit {command}: wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
