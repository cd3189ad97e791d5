"""`rlhfkit pipeline FILE.yaml` and `rlhfkit demo`: the whole recipe from one YAML file.

    output_dir: runs/demo          # every stage writes a sub-folder here
    model: embedded                # the starting policy
    seed: 0
    device: auto                   # auto|cpu|cuda|cuda:N|mps, applied to every stage unless a section says otherwise
    mixed_precision: auto          # auto|bf16|fp16|no, applied to every stage unless a section says otherwise
    gold_scorer: vader             # the simulated annotator's judge, and the evaluation's
    system_prompt: ""              # optional: every stage's system turn (unset: the chat template's default)
    kl_budget: 15.0                # nats per response; the summary checks every trained policy against it
    keep_checkpoints: false        # true: keep each finished stage's checkpoints/ (optimizer state included)
    report_to: [tensorboard]       # optional: experiment trackers (tensorboard, mlflow, wandb, trackio), one group
    lora_r: 16                     # optional: LoRA rank of every trained stage unless a section says otherwise
    extends: demo                  # optional: start from a packaged pipeline or another file; this file's keys win
    stages: [sft, annotate, reward, ppo, eval]
    algos: [ppo, dpo, grpo]        # optional: the fine-tuning stages to run instead of those in `stages`
    sft: {max_steps: 40}           # any field of that stage's config
    annotate: {num_prompts: 128}
    reward: {...}
    ppo: {...}
    eval: {...}

Stages are wired together (SFT output -> annotation model, preferences -> reward model and DPO, reward model
-> PPO, GRPO and RLOO); a key given in a section wins over the wiring. `eval` evaluates the starting policy and
every fine-tuned one (ppo, dpo, grpo, rloo) on the same held-out prompts, against the starting policy, and the
report puts them side by side and on one gold-vs-KL plot. A finished stage leaves `.done` in its folder and is skipped when the
pipeline is run again, so an interrupted pipeline continues where it stopped.

With `annotate: {annotator: human}` the annotate stage writes a labelling project for people, and the
pipeline stops before the first stage that needs pairs (reward or dpo) until they exist: export the labels to
`OUTPUT_DIR/annotate` (or wherever that stage's `data` points) and run the same pipeline again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rlhfkit.config import STAGES, PipelineSettings
from rlhfkit.config_parsing import _yaml_mapping, coerce, preset_path, validate
from rlhfkit.errors import ConfigError

ALL_STAGES = ("sft", "annotate", "reward", "ppo", "dpo", "grpo", "rloo", "eval")
ALGOS = ("ppo", "dpo", "grpo", "rloo")  # the fine-tuning stages: each yields a policy to evaluate
# The file's top-level keys: PipelineSettings' fields (scalars, also flags), the list of stages, and the file it
# extends (a file's key only: a flag already overrides whatever file it is given).
TOP_LEVEL = (*PipelineSettings.__dataclass_fields__, "stages", "extends")


@dataclass
class Pipeline:
    output_dir: Path
    model: str = "embedded"
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"
    gold_scorer: str = "vader"
    system_prompt: str | None = None
    kl_budget: float = 15.0
    keep_checkpoints: bool = False
    lora_r: int | None = None  # every trained stage's LoRA rank unless its section says otherwise
    report_to: list[str] = field(default_factory=list)  # experiment trackers of every stage, as one group
    stages: list[str] = field(default_factory=lambda: ["sft", "annotate", "reward", "ppo", "eval"])
    sections: dict[str, dict] = field(default_factory=dict)
    where: dict[str, dict] = field(default_factory=dict)  # stage -> key -> "file:line" for error messages


def _section_lines(path: Path) -> dict[str, dict[str, int]]:
    """Line of every key inside each top-level mapping, e.g. {'sft': {'max_steps': 12}}."""
    node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    lines: dict[str, dict[str, int]] = {}
    for key, value in getattr(node, "value", []):
        if isinstance(value, yaml.MappingNode):
            lines[key.value] = {k.value: k.start_mark.line + 1 for k, _ in value.value if isinstance(k, yaml.ScalarNode)}
    return lines


def _extended_path(name: str, child: Path, where: str) -> Path:
    """The file that `extends: NAME` names: a packaged pipeline (demo, demo-tiny, ...), else a path relative to
    the file that says it."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: key 'extends': expected a packaged pipeline's name or a file's path, got {name!r}")
    if "/" not in name and not name.endswith((".yaml", ".yml")):
        try:
            return preset_path(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: key 'extends': {exc}") from None
    path = child.parent / name
    if not path.is_file():
        raise ConfigError(f"{where}: key 'extends': {path}: no such file")
    return path


def read_pipeline_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str], dict[str, dict]]:
    """A pipeline file's values with what it `extends` filled in: (values, "file:line" of each top-level key,
    "file:line [stage]" of each section key). The file's own keys win; a stage section is merged key by key,
    so `ppo: {learning_rate: 3e-4}` changes that one setting of the extended file's PPO."""
    values, lines = _yaml_mapping(path)
    nested = _section_lines(path) if values else {}
    top = {key: f"{path}:{lines[key]}" if key in lines else str(path) for key in values}
    sections = {stage: {key: f"{path}:{line} [{stage}]" for key, line in keys.items()} for stage, keys in nested.items()}
    if "extends" not in values:
        return values, top, sections
    parent = _extended_path(values.pop("extends"), path, top.pop("extends"))
    if parent.resolve() in {p.resolve() for p in (*chain, path)}:
        raise ConfigError(f"{path}: key 'extends': {parent} extends this file again (a cycle)")
    merged, merged_top, merged_sections = read_pipeline_file(parent, (*chain, path))
    for key, value in values.items():
        if key in ALL_STAGES and isinstance(value, (dict, type(None))) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **(value or {})}  # an empty section changes nothing
            merged_sections[key] = {**merged_sections.get(key, {}), **sections.get(key, {})}
        else:
            merged[key] = value
            if key in sections:
                merged_sections[key] = sections[key]
        merged_top[key] = top[key]
    return merged, merged_top, merged_sections


def load_pipeline(path: str | Path, overrides: dict | None = None) -> Pipeline:
    """Read and check a pipeline YAML file (top-level keys, stage names, every section key and value)."""
    path = Path(path)
    values, top, section_where = read_pipeline_file(path)
    for key, value in (overrides or {}).items():  # flags (rlhfkit pipeline/demo --key value) win over the file
        if key not in PipelineSettings.__dataclass_fields__ or key == "stages":
            raise ConfigError(f"--{key.replace('_', '-')}: not a pipeline setting (use the YAML file's sections)")
        if key == "algos" and isinstance(value, str):  # --algos ppo,dpo,grpo
            value = [a.strip() for a in value.split(",") if a.strip()]
        values[key] = value
    pipe = Pipeline(output_dir=Path(PipelineSettings.output_dir))
    algos: list[str] = []
    for key, value in values.items():
        where = top.get(key, str(path))  # a flag's value has no line
        if key in STAGES and key in ALL_STAGES:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: key '{key}': expected a mapping of {key} settings")
            pipe.sections[key] = value
            pipe.where[key] = {k: section_where.get(key, {}).get(k, f"{where} [{key}]") for k in value}
            continue
        if key not in TOP_LEVEL:
            raise ConfigError(f"{where}: unknown key '{key}' (pipeline keys: {', '.join(TOP_LEVEL)}, "
                              f"and one section per stage: {', '.join(ALL_STAGES)})")
        if key == "stages":
            if not isinstance(value, list) or not all(s in ALL_STAGES for s in value):
                raise ConfigError(f"{where}: key 'stages': expected a list of {', '.join(ALL_STAGES)}, got {value!r}")
            pipe.stages = list(value)
        elif key == "algos":
            if not isinstance(value, list) or not value or not all(a in ALGOS for a in value):
                raise ConfigError(f"{where}: key 'algos': expected a non-empty list of {', '.join(ALGOS)}, "
                                  f"got {value!r}")
            algos = list(dict.fromkeys(value))
        elif key == "output_dir":
            pipe.output_dir = Path(coerce(PipelineSettings, key, value, where))
        else:  # the same coercion as every stage's settings
            setattr(pipe, key, coerce(PipelineSettings, key, value, where))
    if algos:  # the fine-tuning stages of `stages` give way to `algos`, in its order, before eval
        kept = [st for st in pipe.stages if st not in ALGOS]
        at = kept.index("eval") if "eval" in kept else len(kept)
        pipe.stages = kept[:at] + algos + kept[at:]
    # Check every section now, before any stage runs: a typo in `eval` must not surface after an hour of PPO.
    for stage in pipe.stages:
        stage_config(pipe, stage, {})
    check_data_files(pipe)
    return pipe


# The record kind each stage reads from a `data` / `eval_data` file named in its section.
SECTION_DATA_KINDS = {"sft": "sft", "annotate": "prompt", "reward": "preference", "ppo": "prompt", "dpo": "preference",
                      "grpo": "prompt", "rloo": "prompt", "eval": "prompt"}


def check_data_files(pipe: Pipeline) -> None:
    """Validate every data file the user named, before any stage runs (a bad line in the eval prompts must
    not surface after the training stages). Files an earlier stage writes are wired in later, not named here."""
    from rlhfkit.data.loading import load_records

    human = human_annotation(pipe)
    for stage in pipe.stages:
        for key in ("data", "eval_data"):
            path = pipe.sections.get(stage, {}).get(key)
            if human and stage in PAIR_STAGES and key == "data" and path is not None and not Path(path).exists():
                continue  # the export of people's labels, made while the pipeline waits (run_pipeline)
            if path is not None:
                load_records(str(path), SECTION_DATA_KINDS[stage])


PAIR_STAGES = ("reward", "dpo")  # the stages that train on the annotated preference pairs


def human_annotation(pipe: Pipeline) -> bool:
    """True when people rank the samples (`annotate: {annotator: human}`): the pipeline then stops after
    sampling, and continues on a later run once the labels are exported."""
    return "annotate" in pipe.stages and stage_config(pipe, "annotate", {}).annotator == "human"


def waiting_for_labels(pipe: Pipeline, stage: str, config) -> bool:
    """Before a stage that trains on pairs, with people annotating: True (and say what to do) when the
    exported pairs are not there yet."""
    if stage not in PAIR_STAGES or not human_annotation(pipe) or Path(config.data).exists():
        return False
    annotate = stage_config(pipe, "annotate", {"output_dir": str(pipe.output_dir / "annotate")})
    project = Path(annotate.output_dir) / "labels.sqlite"
    print(f"""pipeline: waiting for people's labels before {stage}: {project} holds the samples to rank.
  rlhfkit label add-annotator {project} NAME     # once per person; prints their token
  rlhfkit label serve {project}
  rlhfkit label export {project} --output-dir {Path(config.data).parent}
then run this pipeline again: it skips the finished stages and trains {stage} on {config.data}.""")
    return True


def stage_config(pipe: Pipeline, stage: str, wiring: dict, extra: dict | None = None):
    """A stage's config: pipeline-wide settings, then the wiring, then the user's section (which wins)."""
    cls = STAGES[stage]
    fields = {f for f in cls.__dataclass_fields__}
    values = {"model": pipe.model, "seed": pipe.seed, "device": pipe.device, "mixed_precision": pipe.mixed_precision,
              "report_to": list(pipe.report_to)}
    if "gold_scorer" in fields:
        values["gold_scorer"] = pipe.gold_scorer
    if pipe.system_prompt is not None:  # None: each stage keeps its own (by default the template's)
        values["system_prompt"] = pipe.system_prompt
    if pipe.lora_r is not None and "lora_r" in fields:  # the trained stages
        values["lora_r"] = pipe.lora_r
    values.update(wiring)
    values.update(extra or {})
    for key, value in pipe.sections.get(stage, {}).items():
        values[key] = value
    where = pipe.where.get(stage, {})
    checked = {k: coerce(cls, k, v, where.get(k, f"pipeline [{stage}]")) for k, v in values.items()}
    config = cls(**checked)
    validate(config)
    return config


def run_pipeline(pipe: Pipeline, runner) -> Path | None:
    """Run every stage of `pipe`; `runner(stage)` gives the function that runs a stage's config (the CLI's).
    Returns None when it stopped to wait for people's labels (`annotate: {annotator: human}`).
    With `report_to`, the stages are tracked as one group (rlhfkit.track.stage.pipeline_tracking)."""
    from rlhfkit.track.stage import pipeline_tracking

    settings = json.loads(json.dumps(asdict(pipe), default=str))
    with pipeline_tracking(pipe.output_dir, pipe.report_to, settings):
        return _run_stages(pipe, runner)


def _run_stages(pipe: Pipeline, runner) -> Path | None:
    out = pipe.output_dir
    policy0 = str(out / "sft") if "sft" in pipe.stages else pipe.model
    wiring = {
        "sft": {"output_dir": str(out / "sft")},
        "annotate": {"model": policy0, "output_dir": str(out / "annotate")},
        "reward": {"model": policy0, "data": str(out / "annotate" / "preferences.jsonl"),
                   "output_dir": str(out / "reward")},
        "dpo": {"model": policy0, "data": str(out / "annotate" / "preferences.jsonl"), "output_dir": str(out / "dpo")},
        **{algo: {"model": policy0, "reward_model": str(out / "reward"), "output_dir": str(out / algo)}
           for algo in ("ppo", "grpo", "rloo")},
    }
    timings: dict[str, float] = {}
    timing_file = out / "timings.json"
    if timing_file.exists():
        timings = json.loads(timing_file.read_text())
    jobs = []
    for stage in pipe.stages:
        if stage != "eval":
            jobs.append((stage, stage, stage_config(pipe, stage, wiring[stage])))
            continue
        # Evaluate the starting policy and every trained one on the same held-out prompts, against policy0.
        policies = {"sft": policy0} | {algo: str(out / algo) for algo in pipe.stages if algo in ALGOS}
        reward_model = str(out / "reward") if "reward" in pipe.stages else None
        for name, model in policies.items():
            jobs.append((f"eval-{name}", "eval", stage_config(
                pipe, "eval", {"model": model, "ref_model": policy0, "reward_model": reward_model,
                               "output_dir": str(out / "eval" / name)})))
    for name, stage, config in jobs:
        done = Path(config.output_dir) / ".done"
        if done.exists():
            print(f"pipeline: {name} already done ({config.output_dir}); skipping")
            continue
        if waiting_for_labels(pipe, stage, config):
            return None
        if stage == "eval" and name != "eval-sft":
            config.best_of_n = 0  # the baseline depends on the reference alone: eval-sft draws it, once
            if (out / "eval" / "sft" / "reference.json").exists():
                # The reference's samples depend on the reference alone: sampled once, by the first evaluation.
                config.reference_samples = str(out / "eval" / "sft")
        if hasattr(config, "checkpoint_at_end") and not pipe.keep_checkpoints:
            # The finished stage's checkpoints are deleted below: writing one after the last step (the model and
            # optimizer state, 3 GB for the embedded PPO's two models) would only cost time.
            config.checkpoint_at_end = False
        if hasattr(config, "resume") and Path(config.output_dir, "checkpoints").is_dir():
            config.resume = True  # an interrupted training stage continues from its last checkpoint
        print(f"pipeline: running {name} -> {config.output_dir}")
        started = time.perf_counter()
        runner(stage)(config)
        timings[name] = time.perf_counter() - started
        if stage == "eval":
            _card_with_evaluation(name.removeprefix("eval-"), Path(config.output_dir), jobs)
        # Made only now: a stage that refuses its input must leave no folder behind (each stage makes its own).
        out.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(timings, indent=2))
        done.write_text("")
        if not pipe.keep_checkpoints:
            # A finished stage's folder already holds its model; the checkpoints add a model and optimizer
            # state per stage (about 2 GB for the embedded default) that only a resume would read.
            shutil.rmtree(Path(config.output_dir) / "checkpoints", ignore_errors=True)
    from rlhfkit.eval.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    write_report(out, pipe.kl_budget, timings, order=("sft", *ALGOS))
    return out


def _card_with_evaluation(policy: str, eval_dir: Path, jobs: list) -> None:
    """Write the evaluated policy's model card again, now with its evaluation (when this pipeline trained it)."""
    from rlhfkit.runtime.model_card import write_model_card

    trained = {name: config for name, stage, config in jobs if stage == name and stage != "eval"}
    config = trained.get(policy)
    if config is not None and (eval_dir / "eval.json").is_file() and Path(config.output_dir, "README.md").is_file():
        write_model_card(Path(config.output_dir), config, policy, json.loads((eval_dir / "eval.json").read_text()))


def demo_path(preset: str | None) -> Path:
    """The packaged pipeline file of `rlhfkit demo` (`--preset tiny`: the seconds-long version)."""
    name = "demo" if preset in (None, "", "default") else f"demo-{preset}"
    try:
        return preset_path(name)
    except ConfigError:
        raise ConfigError(f"unknown demo preset '{preset}' (known: default, tiny, lora)") from None
