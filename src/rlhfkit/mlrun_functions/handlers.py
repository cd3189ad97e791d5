"""rlhfkit's stages as MLRun handlers: `fn.run(handler="sft", params={...}, local=True)` and so on.

Every handler takes the MLRun context, its stage's inputs (data sets as `DataItem`s, model folders as paths),
`settings` (the stage's keys as in its YAML section or `--help`) and `preset` ('tiny' for a tiny model), runs
the stage in this process, and logs what it wrote:
- a trained model as a model artifact (`model`: the HF folder, or the LoRA adapter folder, every file of it),
  with the folder's path as the result `model_dir`, which the next stage takes as its `model`;
- annotate's preference pairs and rankings as data sets (`preferences`, `rankings`), with `preferences_path`;
- eval's `eval.json` and `samples.jsonl` as artifacts, and every `*_mean` of eval.json as a result;
- the stage's final logged metrics as results (`/` becomes `_`: `train_loss`, `eval_accuracy`).
A stage that fails raises, and MLRun marks its run as failed. Nothing is read from or sent to a server.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlrun

STAGE_FOLDER = "rlhfkit"


def sft(context: mlrun.MLClientCtx, model: str = "embedded", train_data: mlrun.DataItem = None,
        settings: dict = None, preset: str = None) -> None:
    """Supervised fine-tuning on prompt/completion records.

    :param context: MLRun context
    :param model: starting policy: a local HF folder, 'embedded' (SmolLM2-135M-Instruct) or 'tiny'
    :param train_data: JSONL of {"prompt", "completion"} or {"messages"}; default: the chatterbot corpus
    :param settings: SFT settings, as in an sft YAML section (e.g. {"max_steps": 30, "lora_r": 16})
    :param preset: 'tiny' or 'default' (the embedded demo's settings)
    """
    out = _run(context, "sft", settings, preset, model=model, data=_local(train_data))
    _log_model(context, out)


def annotate(context: mlrun.MLClientCtx, model: str, prompts: mlrun.DataItem = None, settings: dict = None,
             preset: str = None) -> None:
    """Sample responses per prompt and rank them with the simulated annotator: preference pairs.

    :param context: MLRun context
    :param model: the policy that samples (usually sft's model_dir)
    :param prompts: JSONL of {"prompt"}; default: the chatterbot corpus prompts (training split)
    :param settings: annotate settings (e.g. {"num_prompts": 64, "responses_per_prompt": 4})
    :param preset: 'tiny' or 'default'
    """
    out = _run(context, "annotate", settings, preset, model=model, data=_local(prompts))
    for key in ("preferences", "rankings"):
        context.log_artifact(key, local_path=str(out / f"{key}.jsonl"), format="jsonl")
    context.log_result("preferences_path", str(out / "preferences.jsonl"))
    for key, value in json.loads((out / "summary.json").read_text()).items():
        if isinstance(value, (int, float)):
            context.log_result(key, value)


def reward(context: mlrun.MLClientCtx, model: str, preferences: mlrun.DataItem, settings: dict = None,
           preset: str = None) -> None:
    """Train a reward model (the LM trunk and a scalar head) on preference pairs, Bradley-Terry loss.

    :param context: MLRun context
    :param model: the trunk to start from (usually sft's model_dir)
    :param preferences: JSONL of {"prompt", "chosen", "rejected"} (annotate's preferences)
    :param settings: reward settings (e.g. {"num_epochs": 2})
    :param preset: 'tiny' or 'default'
    """
    out = _run(context, "reward", settings, preset, model=model, data=_local(preferences))
    _log_model(context, out)


def ppo(context: mlrun.MLClientCtx, model: str, reward_model: str, prompts: mlrun.DataItem = None,
        settings: dict = None, preset: str = None) -> None:
    """Fine-tune the policy with PPO against the reward model, KL to the starting policy.

    :param context: MLRun context
    :param model: the starting policy, also the reference (usually sft's model_dir)
    :param reward_model: the reward model folder (reward's model_dir)
    :param prompts: JSONL of {"prompt"}; default: the chatterbot corpus prompts (training split)
    :param settings: PPO settings (e.g. {"max_steps": 20, "kl_coef": 0.05})
    :param preset: 'tiny' or 'default'
    """
    _rl(context, "ppo", model, reward_model, prompts, settings, preset)


def grpo(context: mlrun.MLClientCtx, model: str, reward_model: str, prompts: mlrun.DataItem = None,
         settings: dict = None, preset: str = None) -> None:
    """Fine-tune the policy with GRPO (group-relative advantages, no critic) against the reward model.

    :param context: MLRun context
    :param model: the starting policy (usually sft's model_dir)
    :param reward_model: the reward model folder (reward's model_dir)
    :param prompts: JSONL of {"prompt"}; default: the chatterbot corpus prompts (training split)
    :param settings: GRPO settings (e.g. {"max_steps": 20, "num_generations": 4})
    :param preset: 'tiny' or 'default'
    """
    _rl(context, "grpo", model, reward_model, prompts, settings, preset)


def dpo(context: mlrun.MLClientCtx, model: str, preferences: mlrun.DataItem, settings: dict = None,
        preset: str = None) -> None:
    """Fine-tune the policy with DPO directly on preference pairs, the starting policy as reference.

    :param context: MLRun context
    :param model: the starting policy (usually sft's model_dir)
    :param preferences: JSONL of {"prompt", "chosen", "rejected"} (annotate's preferences)
    :param settings: DPO settings (e.g. {"beta": 0.1})
    :param preset: 'tiny' or 'default'
    """
    out = _run(context, "dpo", settings, preset, model=model, data=_local(preferences))
    _log_model(context, out)


def evaluate(context: mlrun.MLClientCtx, model: str, ref_model: str = None, reward_model: str = None,
             prompts: mlrun.DataItem = None, settings: dict = None, preset: str = None) -> None:
    """Evaluate a policy on held-out prompts: gold and reward-model scores, exact KL, win rate, benchmark.

    :param context: MLRun context
    :param model: the policy to evaluate (a trained stage's model_dir)
    :param ref_model: the reference for KL and win rate (usually sft's model_dir); default: model itself
    :param reward_model: the reward model folder, for the proxy score (optional)
    :param prompts: JSONL of {"prompt"}; default: the chatterbot corpus's held-out prompts
    :param settings: eval settings (e.g. {"num_prompts": 75, "benchmark": "lm-eval:rlhfkit_reply_choice"})
    :param preset: 'tiny' or 'default'
    """
    out = _run(context, "eval", settings, preset, model=model, ref_model=ref_model, reward_model=reward_model,
               data=_local(prompts))
    result = json.loads((out / "eval.json").read_text())
    for key, value in result.items():
        if key.endswith("_mean"):
            context.log_result(key, value)
    context.log_artifact("eval", local_path=str(out / "eval.json"))
    context.log_artifact("samples", local_path=str(out / "samples.jsonl"), format="jsonl")
    context.log_result("eval_dir", str(out))


def _rl(context, stage: str, model: str, reward_model: str, prompts, settings, preset) -> None:
    out = _run(context, stage, settings, preset, model=model, reward_model=reward_model, data=_local(prompts))
    _log_model(context, out)


def _local(item) -> str | None:
    """A DataItem's local file (MLRun downloads a remote one), or None."""
    return None if item is None else item.local()


def _run(context, stage: str, settings: dict | None, preset: str | None, **wired) -> Path:
    """Build the stage's config (preset < settings < what the handler wires), run it, return its folder.
    The folder is `<artifact path>/rlhfkit/<run uid>/<stage>`: a rerun never writes over an earlier one."""
    from rlhfkit.cli import quiet_transformers, runner
    from rlhfkit.config_parsing import build_config

    out = _work_folder(context) / STAGE_FOLDER / context.uid / stage
    overrides = dict(settings or {}) | {k: v for k, v in wired.items() if v is not None} | {"output_dir": str(out)}
    config = build_config(stage, None, preset, overrides)
    quiet_transformers()
    if not hasattr(sys.stdout, "isatty"):
        # MLRun's local runner tees stdout through an object without isatty(), which transformers calls when
        # it reports newly initialised weights (the reward model's head).
        sys.stdout.isatty = lambda: False
    runner(stage)(config)
    _log_metrics(context, out)
    return out


def _work_folder(context) -> Path:
    """Where stages write: the run's artifact path when it is a local folder; else (s3://, v3io://, ...) a
    local temporary folder, from which the artifacts are uploaded there."""
    where = str(context.artifact_path or ".")
    if "://" not in where or where.startswith("file://"):
        return Path(where.removeprefix("file://"))
    import tempfile

    return Path(tempfile.mkdtemp(prefix="rlhfkit-mlrun-"))


def _log_metrics(context, out: Path) -> None:
    """The last value of every metric in the stage's metrics.jsonl, as run results."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return
    last: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        for key, value in json.loads(line).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                last[key.replace("/", "_")] = value
    for key, value in sorted(last.items()):
        context.log_result(key, value)


def _log_model(context, out: Path) -> None:
    """The stage's output folder as a model artifact, every file of it (tokenizer, config, model card, ...)."""
    weights = "model.safetensors" if (out / "model.safetensors").is_file() else "adapter_model.safetensors"
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():  # a resume's state, not part of the model
        shutil.rmtree(checkpoints)
    extra = {str(p.relative_to(out)): str(p.relative_to(out)) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != weights}
    context.log_model("model", model_dir=str(out), model_file=weights, extra_data=extra, framework="pytorch")
    context.log_result("model_dir", str(out))
