"""From a stage's config to what the planner counts: the weight sets in memory, the roles they play, the batch
shapes of each phase and the numerics.

LoRA (`lora_r` > 0; the fields of issue 14, read with getattr until config.py has them): one frozen base serves
the policy (adapter "policy"), the reference (adapters off) and, in PPO, the critic (adapter "critic" plus a
value head); the reward model is its own model unless its folder is a PEFT adapter on the same base.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rlhfkit.errors import UserError
from rlhfkit.plan.devices import Device
from rlhfkit.plan.memory import Numerics
from rlhfkit.plan.shapes import ModelShape, adapter_base, resolve_shape

TRAINING_STAGES = ("sft", "reward", "dpo", "ppo", "grpo", "rloo")


@dataclass(frozen=True)
class Knobs:
    """The settings a suggestion may change (the others come from the config as they are)."""

    gradient_checkpointing: bool = False
    micro_batch: int = 1           # sequences (SFT) or pairs (reward, DPO) or samples (RL) per forward
    lora_r: int = 0
    lora_targets: tuple[str, ...] | None = None
    frozen_half: bool = False      # frozen models' linear layers in fp16/bf16
    layout: str = "single"         # 'single': every model on one device; 'spread': one model per device;
                                   # 'fsdp': trained models sharded over all devices, frozen ones whole (N processes)
    offload_optimizer: bool = False  # AdamW state in host memory (DeepSpeed ZeRO-Offload style)
    shard_frozen: bool = False     # fsdp_frozen: shard: under 'fsdp', the RL stages' frozen models sharded too


@dataclass(frozen=True)
class WeightSet:
    """One set of weights in memory (a model, or a LoRA base with its adapters)."""

    name: str
    shape: ModelShape
    lm_head: bool                  # a causal LM (else trunk + scalar head)
    trained: str                   # 'full', 'lora' or 'frozen'
    serves: tuple[str, ...]        # the roles it plays: policy, reference, critic, reward model
    adapters: tuple[str, ...] = ()  # LoRA adapters trained on it
    value_head: bool = False       # a LoRA base that also carries the critic's value head


@dataclass(frozen=True)
class Workload:
    stage: str
    weights: tuple[WeightSet, ...]
    seq_len: int                   # T of a training forward (prompt + response, the padded worst case)
    response_len: int              # tokens through the LM head per sequence (DPO, RL: the response)
    rows_per_item: int             # 2 for pairs (reward, DPO: chosen and rejected rows), else 1
    accumulation: int              # micro-batches per optimizer step
    mini_batch: int                # items per optimizer step (micro x accumulation)
    gen_batch: int = 0             # sequences decoded at once (RL)
    prompt_len: int = 0
    new_tokens: int = 0
    score_batch: int = 0           # sequences per no-grad scoring forward (RL)
    need_old_logprobs: bool = True  # GRPO skips the policy's scoring pass when its one step is on-policy
    precompute_reference: bool = False  # DPO: the reference scores once, then is freed
    with_entropy: bool = False     # RL: the policy's forward also computes entropies
    mixed_precision: str = "auto"
    dtype_bytes: int = 4
    attn: str = "eager"
    knobs: Knobs = field(default_factory=Knobs)
    notes: tuple[str, ...] = ()

    def role(self, name: str) -> WeightSet | None:
        return next((w for w in self.weights if name in w.serves), None)

    def trained_roles(self) -> list[str]:
        return [r for r in ("policy", "critic", "reward model") if self.is_trained(r)]

    def is_trained(self, role: str) -> bool:
        w = self.role(role)
        if w is None:
            return False
        if w.trained == "full":
            return True
        return w.trained == "lora" and role in w.adapters

    def numerics(self, device: Device) -> Numerics:
        return Numerics.of(compute_mode(self.mixed_precision, device), self.dtype_bytes)


def compute_mode(mixed_precision: str, device: Device) -> str:
    """'fp32', 'bf16' or 'fp16' as rlhfkit resolves `mixed_precision` on that device: 'auto' is bf16 where it is
    native, fp16 (with a loss scaler) on GPUs without bf16 (T4, V100), fp32 on a CPU (one with AVX512-BF16 or
    AMX would get bf16: pass --mixed-precision bf16 to plan that)."""
    if mixed_precision == "no":
        return "fp32"
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    if device.is_cpu:
        return "fp32"
    return "bf16" if device.bf16 else "fp16"


def _attn(config) -> str:
    from rlhfkit.models.loading import attention_kernel

    return attention_kernel(getattr(config, "attn_implementation", "auto"))


def knobs_from_config(stage: str, config) -> Knobs:
    targets = getattr(config, "lora_target_modules", None)
    if targets in (None, "", "all-linear"):
        targets = None
    elif isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip()) or None
    return Knobs(gradient_checkpointing=bool(getattr(config, "gradient_checkpointing", False)),
                 micro_batch=micro_batch_of(stage, config), lora_r=int(getattr(config, "lora_r", 0) or 0),
                 lora_targets=tuple(targets) if targets else None,
                 shard_frozen=getattr(config, "fsdp_frozen", "replicate") == "shard")


def micro_batch_of(stage: str, config) -> int:
    if stage in ("sft", "reward", "dpo"):
        return config.batch_size
    if stage == "ppo":
        return max(1, config.mini_batch_size // config.gradient_accumulation_steps)
    mini = config.mini_batch_size or config.prompts_per_step * config.num_generations
    return max(1, mini // config.gradient_accumulation_steps)


def build_workload(stage: str, config, knobs: Knobs | None = None) -> Workload:
    """The workload of `stage` under `config`, with `knobs` (default: the config's own settings)."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"plan covers the training stages ({', '.join(TRAINING_STAGES)}), not '{stage}'")
    knobs = knobs or knobs_from_config(stage, config)
    policy = resolve_shape(config.model)
    notes = [policy.note] if policy.note else []
    lora = knobs.lora_r > 0
    common = dict(mixed_precision=config.mixed_precision,
                  dtype_bytes=2 if config.dtype == "bfloat16" else 4, attn=_attn(config), knobs=knobs)
    T = config.max_length
    if stage == "sft":
        w = WeightSet("policy", policy, True, "lora" if lora else "full", ("policy",),
                      adapters=("policy",) if lora else ())
        accum = config.gradient_accumulation_steps
        return Workload(stage, (w,), T, T, 1, _accum(config.batch_size * accum, knobs), config.batch_size * accum,
                        notes=tuple(notes), **common)
    if stage == "reward":
        w = WeightSet("reward model", policy, False, "lora" if lora else "full", ("reward model",),
                      adapters=("reward model",) if lora else (), value_head=lora)
        mini = config.batch_size * config.gradient_accumulation_steps
        return Workload(stage, (w,), T, 0, 2, _accum(mini, knobs), mini, notes=tuple(notes), **common)
    if stage == "dpo":
        response = T - config.max_prompt_length
        mini = config.batch_size * config.gradient_accumulation_steps
        if lora:
            weights = (WeightSet("base (policy adapter; reference = adapters off)", policy, True, "lora",
                                 ("policy", "reference"), adapters=("policy",)),)
        else:
            ref = resolve_shape(config.ref_model) if config.ref_model else policy
            weights = (WeightSet("policy", policy, True, "full", ("policy",)),
                       WeightSet("reference", ref, True, "frozen", ("reference",)))
        return Workload(stage, weights, T, response, 2, _accum(mini, knobs), mini,
                        precompute_reference=config.precompute_ref_logprobs, notes=tuple(notes), **common)
    # RL stages
    P, N = config.max_prompt_length, config.max_new_tokens
    reward_shape, reward_note = _reward_shape(config, policy)
    if reward_note:
        notes.append(reward_note)
    reward_on_base = lora and adapter_base(getattr(config, "reward_model", None)) is not None
    if stage == "ppo":
        gen = config.rollout_batch_size
        mini = config.mini_batch_size
        critic_shape = reward_shape if config.critic_init == "reward" else policy
        if lora:
            serves = ("policy", "reference", "critic") + (("reward model",) if reward_on_base else ())
            weights = [WeightSet("base (policy, critic adapters; reference = adapters off)", policy, True, "lora",
                                 serves, adapters=("policy", "critic"), value_head=True)]
            if not reward_on_base:
                weights.append(WeightSet("reward model", reward_shape, False, "frozen", ("reward model",)))
        else:
            weights = [WeightSet("policy", policy, True, "full", ("policy",)),
                       WeightSet("reference", resolve_shape(config.ref_model) if config.ref_model else policy, True,
                                 "frozen", ("reference",)),
                       WeightSet("critic", critic_shape, False, "full", ("critic",)),
                       WeightSet("reward model", reward_shape, False, "frozen", ("reward model",))]
        need_old = not config.logprobs_from_sampling
    else:
        gen = config.prompts_per_step * config.num_generations
        mini = config.mini_batch_size or gen
        has_ref = config.beta > 0
        if lora:
            serves = ("policy",) + (("reference",) if has_ref else ()) + (("reward model",) if reward_on_base else ())
            weights = [WeightSet("base (policy adapter" + ("; reference = adapters off)" if has_ref else ")"),
                                 policy, True, "lora", serves, adapters=("policy",))]
        else:
            weights = [WeightSet("policy", policy, True, "full", ("policy",))]
            if has_ref:
                weights.append(WeightSet("reference", resolve_shape(config.ref_model) if config.ref_model else policy,
                                         True, "frozen", ("reference",)))
        if config.reward_model and not reward_on_base:
            weights.append(WeightSet("reward model", reward_shape, False, "frozen", ("reward model",)))
        single_step = config.num_iterations == 1 and mini == gen
        need_old = has_ref or not single_step
    accum = _accum(mini, knobs)
    score = config.forward_batch_size or knobs.micro_batch
    return Workload(stage, tuple(weights), P + N, N, 1, accum, mini, gen_batch=gen, prompt_len=P, new_tokens=N,
                    score_batch=score, need_old_logprobs=need_old, with_entropy=True, notes=tuple(notes), **common)


def _accum(mini: int, knobs: Knobs) -> int:
    return max(1, -(-mini // max(1, knobs.micro_batch)))


def _reward_shape(config, policy: ModelShape) -> tuple[ModelShape, str]:
    folder = getattr(config, "reward_model", None)
    if not folder:
        return policy, ""
    base = adapter_base(folder)
    try:
        return resolve_shape(base or folder), ""
    except UserError:  # a folder an earlier stage will write: plan it like the policy, and say so
        return replace(policy, name=f"{policy.name} (as the reward model)"), (
            f"reward model '{folder}' not found: planned with the policy's shape")
