"""Where each model goes, what each device holds in each phase, whether it fits, and what would make it fit.

A phase is a list of moments (the end of a forward, the start and end of a backward, a decoding step, ...);
each moment says what every device holds, by kind: weights, weight copies (autocast's half-precision casts of
trained weights, which it keeps for the length of its context, and the sampler's half copy of the policy),
gradients, optimizer state, activations, logits, KV cache, other (caches, masks, FSDP's gathered layers). A
device's use in a phase is its worst moment, and its peak is its worst phase.

Layouts:
- single: every model on one device, one process (what `rlhfkit <stage>` runs);
- spread: each model whole on its own device, largest first onto the least loaded one (model placement, as
  OpenRLHF places actor, critic, reference and reward on separate GPUs; rlhfkit runs one device per stage today);
- fsdp: one process per device (`torchrun --nproc-per-node N`, `distributed: fsdp`), each with its share of
  the global batch; every trained model sharded over all N (weights, gradients and optimizer state / N, plus the
  layers FSDP gathers while it computes; with LoRA its frozen base too, sharded with its adapters), and every
  frozen model of its own (a reference, a reward model) whole on each device, as rlhfkit runs it. A rollout
  (PPO, GRPO, RLOO) gathers the trained models whole once, for generation and scoring. With `fsdp_frozen: shard`
  (knob `shard_frozen`, PPO, GRPO and RLOO) the frozen models are sharded too, and each rollout gathers them
  whole for their own scoring pass, with the trained models sharded again meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import rlhfkit.plan.memory as mem
from rlhfkit.plan.devices import Device
from rlhfkit.plan.workload import WeightSet, Workload, compute_mode

CATEGORIES = ("weights", "weight copies", "gradients", "optimizer", "activations", "logits", "kv cache", "other")
TIGHT = 0.9  # above this share of a device's usable memory a plan "fits, tight": fragmentation may tip it over


@dataclass
class DeviceUse:
    device: Device
    phase: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    workload: Workload
    devices: list[Device]
    placement: dict[str, list[int]]           # weight set name -> device indices (several: sharded)
    phases: dict[str, list[DeviceUse]]        # phase -> use of each device (its worst moment)
    host_bytes: int = 0                       # optimizer state offloaded to the host
    activations: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> {'saved', 'checkpointed'}

    def peak(self, index: int) -> DeviceUse:
        return max((uses[index] for uses in self.phases.values()), key=lambda u: u.total)

    def status(self, index: int) -> str:
        use, usable = self.peak(index).total, self.devices[index].usable_bytes
        if use > usable:
            return "does not fit"
        return "fits, tight" if use > TIGHT * usable else "fits"

    @property
    def fits(self) -> bool:
        return all(self.peak(i).total <= d.usable_bytes for i, d in enumerate(self.devices))

    def worst_device(self) -> int:
        return max(range(len(self.devices)), key=lambda i: self.peak(i).total / self.devices[i].usable_bytes)


# --- resident bytes of a weight set -------------------------------------------------------------------------
def trainable_params(ws: WeightSet, wl: Workload) -> int:
    s = ws.shape
    if ws.trained == "full":
        return s.params if ws.lm_head else s.trunk_params + s.scalar_head_params()
    if ws.trained == "lora":
        return len(ws.adapters) * s.lora_params(wl.knobs.lora_r, wl.knobs.lora_targets) + (
            s.hidden if ws.value_head else 0)
    return 0


def param_bytes(ws: WeightSet, wl: Workload) -> int:
    """Bytes per trainable parameter: the stage's dtype for full fine-tuning; adapters are fp32."""
    return wl.dtype_bytes if ws.trained == "full" else 4


def linears_in_bf16(ws: WeightSet, wl: Workload, device: Device) -> bool:
    """Whether rlhfkit stores the frozen linear layers of this weight set in bf16 (under bf16, not fp16): a frozen
    model's (models/precision.store_linears_in_bf16), and a LoRA base's unless FSDP shards it
    (store_lora_base_in_bf16)."""
    if compute_mode(wl.mixed_precision, device) != "bf16" or wl.dtype_bytes == 2:
        return False
    return ws.trained == "frozen" or (ws.trained == "lora" and wl.knobs.layout != "fsdp")


def weight_bytes(ws: WeightSet, wl: Workload, device: Device) -> int:
    if ws.trained == "full":
        return mem.weight_bytes(ws.shape, ws.lm_head, wl.dtype_bytes)
    if wl.knobs.frozen_half:
        base = mem.weight_bytes(ws.shape, ws.lm_head, 2)
    else:
        base = mem.weight_bytes(ws.shape, ws.lm_head, wl.dtype_bytes, half_linears=linears_in_bf16(ws, wl, device))
    return base + trainable_params(ws, wl) * 4


def fp32_bytes(ws: WeightSet, wl: Workload, device: Device) -> int:
    """The part of a weight set held in fp32 (what a half-precision copy of all of it would halve)."""
    if ws.trained == "full":
        return weight_bytes(ws, wl, device) if wl.dtype_bytes == 4 else 0
    if wl.knobs.frozen_half or wl.dtype_bytes == 2:
        return trainable_params(ws, wl) * 4  # only the adapters
    if linears_in_bf16(ws, wl, device):  # the linear layers are bf16 already
        return weight_bytes(ws, wl, device) - mem.block_linear_params(ws.shape) * 2
    return weight_bytes(ws, wl, device)


def autocast_cache_bytes(ws: WeightSet, wl: Workload, device: Device) -> int:
    """Autocast keeps a half copy of every trained (requires-grad) linear weight it casts until its context
    exits (a mini-batch, a rollout); frozen weights are cast anew each time and dropped."""
    if not wl.numerics(device).autocast or ws.trained != "full" or wl.dtype_bytes == 2:
        return 0
    return ws.shape.layers * ws.shape.layer_linear_params() * 2


def fsdp_gather_bytes(ws: WeightSet, wl: Workload, n: int) -> int:
    """Unsharded parameters FSDP holds while it computes: the root unit (embedding, head, final norm) and two
    blocks (the one running and the one prefetched), less this device's own shards of them."""
    if n <= 1:
        return 0
    s = ws.shape
    b = 2 if ws.trained != "full" and wl.knobs.frozen_half else wl.dtype_bytes
    block = s.layer_linear_params() + s.layer_other_params()
    root = s.embed_params + (s.head_params if ws.lm_head else s.hidden) + s.final_norm_params
    return int((root + 2 * block) * b * (1 - 1 / n))


# --- activations of one trained pass --------------------------------------------------------------------------
@dataclass
class Pass:
    """What one forward + backward of a trained role keeps and makes, on each of its devices."""

    blocks_saved: int        # all blocks' saved tensors (checkpointed: their inputs)
    blocks_saved_alt: int    # the same with checkpointing the other way round (for the report)
    recompute: int           # checkpointed: one block's saved tensors, rebuilt in the backward
    block_transient: int
    head_saved: int
    head_forward: int
    head_backward: int
    head_grad: int           # gradient the head's backward allocates first
    embed_transient: int     # a tied, trained embedding's dense gradient, added into the existing one
    other: int               # forward cache, attention mask


def per_process(items: int, wl: Workload, n: int) -> int:
    """Batch sizes in configs are global: with FSDP over n processes each takes its share."""
    return -(-items // n) if wl.knobs.layout == "fsdp" else items


def trained_pass(role: str, ws: WeightSet, wl: Workload, device: Device, n: int = 1) -> Pass:
    s, num, k = ws.shape, wl.numerics(device), wl.knobs
    b, T, H, V = per_process(k.micro_batch, wl, n) * wl.rows_per_item, wl.seq_len, ws.shape.hidden, ws.shape.vocab
    lora_r = k.lora_r if ws.trained == "lora" else 0
    full = ws.trained == "full"
    per_block = sum(mem.block_saved(s, b, T, num, wl.attn, norms_trained=full, lora_r=lora_r).values())
    inputs = b * T * H * 4
    saved, checkpointed = s.layers * per_block, s.layers * inputs
    final_norm = b * T * H * 4 * (2 if full and s.family == "llama" else 1)
    if role == "policy" and wl.stage == "sft":
        head_saved = mem.full_logits_bytes(b, T, V, num) + b * T * H * num.act
        chunk = min(b * T, max(1, mem.LOGPROB_CHUNK_ELEMENTS // V)) * V * 4
        head_forward, head_backward = chunk, mem.full_logits_backward_extra(b, T, V)
    elif role == "policy":
        n = b * wl.response_len
        chunk = mem.fused_head_chunk(n, V)
        head_saved = n * H * 4
        head_forward = mem.fused_head_forward_chunks(wl.with_entropy) * chunk
        head_backward = n * H * 4 + mem.FUSED_HEAD_BACKWARD_CHUNKS * chunk
    elif role == "critic":
        head_saved, head_forward, head_backward = b * T * H * 4, 0, b * T * H * 4
    else:  # reward model: the last token's hidden state through a scalar head
        head_saved, head_forward, head_backward = b * H * 4, 0, b * T * H * 4
    trains_head = full and ws.lm_head and role == "policy"
    head_grad = s.vocab * H * wl.dtype_bytes if trains_head else H * 4
    # a tied embedding gets the head's gradient first, then the lookup's dense one is added into it
    embed_transient = s.vocab * H * wl.dtype_bytes if full and s.tied and ws.lm_head else 0
    cache = 0
    if wl.stage in ("sft", "reward") and not k.gradient_checkpointing:
        cache = mem.forward_cache_bytes(s, b, T, num)
    return Pass(
        blocks_saved=(checkpointed if k.gradient_checkpointing else saved) + final_norm,
        blocks_saved_alt=(saved if k.gradient_checkpointing else checkpointed) + final_norm,
        recompute=per_block if k.gradient_checkpointing else 0,
        block_transient=mem.block_backward_transient(s, b, T, num, wl.attn, norms_trained=full),
        head_saved=head_saved, head_forward=head_forward, head_backward=head_backward, head_grad=head_grad,
        embed_transient=embed_transient, other=cache + mem.attention_mask_bytes(b, T, wl.attn))


def inference_moment(role: str, ws: WeightSet, wl: Workload, device: Device, rows: int, T: int) -> dict[str, int]:
    """A no-grad forward of `rows` sequences of T tokens (scoring, DPO's reference)."""
    s, num = ws.shape, wl.numerics(device)
    out = {"activations": mem.block_inference_transient(s, rows, T, num, wl.attn) + rows * T * s.hidden * 4}
    if role in ("policy", "reference"):
        n = rows * wl.response_len
        out["logits"] = n * s.hidden * 4 + mem.fused_head_forward_chunks(False) * mem.fused_head_chunk(n, s.vocab)
    if role == "reward model":  # score_sequences leaves use_cache on: every block's keys and values
        out["kv cache"] = mem.kv_cache_bytes(s, rows, T, num.act)
    return out


# --- the plan -------------------------------------------------------------------------------------------------
def place(wl: Workload, devices: list[Device]) -> dict[str, list[int]]:
    layout = wl.knobs.layout
    if layout == "fsdp":
        return {ws.name: list(range(len(devices))) for ws in wl.weights}
    if layout == "single" or len(devices) == 1:
        return {ws.name: [0] for ws in wl.weights}
    load = [0] * len(devices)
    placement = {}
    for ws in sorted(wl.weights, key=lambda w: -resident(w, wl, devices[0])):
        i = min(range(len(devices)), key=lambda j: (load[j] / devices[j].usable_bytes, j))
        placement[ws.name] = [i]
        load[i] += resident(ws, wl, devices[i])
    return placement


def frozen_sharded(wl: Workload) -> bool:
    """Whether the frozen models are sharded under FSDP: `fsdp_frozen: shard`, which the RL stages honour (their
    frozen models only score rollouts; DPO's reference runs inside the loss, whole)."""
    return wl.knobs.layout == "fsdp" and wl.knobs.shard_frozen and wl.stage in ("ppo", "grpo", "rloo")


def is_sharded(ws: WeightSet, wl: Workload) -> bool:
    """Whether FSDP shards this weight set: every trained one (a LoRA base too), a frozen one with
    `frozen_sharded`."""
    return ws.trained != "frozen" or frozen_sharded(wl)


def resident(ws: WeightSet, wl: Workload, device: Device) -> int:
    t = trainable_params(ws, wl) * param_bytes(ws, wl)
    return weight_bytes(ws, wl, device) + 3 * t


def plan(wl: Workload, devices: list[Device]) -> Plan:
    if wl.knobs.layout == "fsdp" and len(devices) < 2:
        wl = replace(wl, knobs=replace(wl.knobs, layout="single"))
    placement = place(wl, devices)
    n = len(devices) if wl.knobs.layout == "fsdp" else 1

    def shard_of(ws: WeightSet) -> float:
        """The share of a weight set each device holds: FSDP shards trained models; frozen ones stay whole unless
        `frozen_sharded`."""
        return 1 / n if is_sharded(ws, wl) else 1.0

    by_name = {ws.name: ws for ws in wl.weights}

    def blank() -> dict[int, dict[str, int]]:
        return {i: dict.fromkeys(CATEGORIES, 0) for i in range(len(devices))}

    def add(moment, ws_name, category, value):
        for i in placement[ws_name]:
            moment[i][category] += int(value)

    def base(optimizer: bool = True) -> dict[int, dict[str, int]]:
        moment = blank()
        for ws in wl.weights:
            for i in placement[ws.name]:
                moment[i]["weights"] += int(weight_bytes(ws, wl, devices[i]) * shard_of(ws))
                if optimizer and not wl.knobs.offload_optimizer:
                    moment[i]["optimizer"] += int(mem.adam_state_bytes(trainable_params(ws, wl),
                                                                       param_bytes(ws, wl)) * shard_of(ws))
        return moment

    def grads(ws: WeightSet) -> int:
        if ws.trained == "lora":  # every adapter on this base: their gradients live together
            return int(trainable_params(ws, wl) * 4 * shard_of(ws))
        return int(trainable_params(ws, wl) * param_bytes(ws, wl) * shard_of(ws))

    def gather(moment, ws: WeightSet):
        if ws.trained != "frozen":  # a whole frozen model gathers nothing
            add(moment, ws.name, "other", fsdp_gather_bytes(ws, wl, n))

    def gather_whole(moment, frozen: bool = False):
        """A rollout under FSDP holds every trained model whole (models.parallel.gathered_whole: gathered once,
        so that generation needs no collective per token), or with `frozen` the sharded frozen ones instead,
        for their scoring pass: each device adds the shards it does not own."""
        for ws in wl.weights:
            if is_sharded(ws, wl) and (ws.trained == "frozen") == frozen and n > 1:
                add(moment, ws.name, "other", weight_bytes(ws, wl, dev[ws.name]) * (1 - 1 / n))

    dev = {ws.name: devices[placement[ws.name][0]] for ws in wl.weights}
    phases: dict[str, list[list[dict]]] = {}
    activations: dict[str, dict[str, int]] = {}

    def train_pass(role: str, alive: dict[str, int]) -> list:
        """Moments of one micro-batch's forward and backward of `role`; `alive`: gradients held meanwhile,
        per weight set (earlier micro-batches, another model's)."""
        ws = wl.role(role)
        p = trained_pass(role, ws, wl, dev[ws.name], n)
        activations[role] = {"saved": p.blocks_saved, "checkpointed" if not wl.knobs.gradient_checkpointing
                             else "not checkpointed": p.blocks_saved_alt}
        pre = alive.get(ws.name, 0)
        g = grads(ws)
        moments = []
        for acts, logits, other, own in (
                (p.blocks_saved, p.head_saved + p.head_forward, p.other, pre),
                (p.blocks_saved, p.head_saved + p.head_backward, 0, max(pre, p.head_grad * shard_of(ws))),
                (p.blocks_saved + p.recompute + p.block_transient, 0, 0, max(pre, p.head_grad * shard_of(ws))),
                (0, 0, 0, g + p.embed_transient)):
            m = base()
            for name, held in alive.items():
                if name != ws.name:
                    add(m, name, "gradients", held)
            add(m, ws.name, "gradients", own)
            add(m, ws.name, "activations", acts)
            add(m, ws.name, "logits", logits)
            add(m, ws.name, "other", other)
            for held in wl.weights:
                add(m, held.name, "weight copies", autocast_cache_bytes(held, wl, dev[held.name]) * shard_of(held))
            gather(m, ws)
            moments.append(m)
        return moments

    accumulating = wl.accumulation > 1
    if wl.stage in ("sft", "reward", "dpo"):
        role = "reward model" if wl.stage == "reward" else "policy"
        ws = wl.role(role)
        alive = {ws.name: grads(ws)} if accumulating else {}
        moments = train_pass(role, alive)
        ref = wl.role("reference")
        if ref is not None and not wl.precompute_reference:
            # DPO: the reference's no-grad forward runs while the policy's activations are kept
            m = base()
            p = trained_pass(role, ws, wl, dev[ws.name], n)
            add(m, ws.name, "gradients", alive.get(ws.name, 0))
            add(m, ws.name, "activations", p.blocks_saved)
            add(m, ws.name, "logits", p.head_saved)
            rows = per_process(wl.knobs.micro_batch, wl, n) * wl.rows_per_item
            for cat, value in inference_moment("reference", ref, wl, dev[ref.name], rows, wl.seq_len).items():
                add(m, ref.name, cat, value)
            gather(m, ref)
            moments.append(m)
        phases["train"] = moments
        if ref is not None and wl.precompute_reference:
            m = base(optimizer=False)
            rows = per_process(wl.knobs.micro_batch, wl, n) * wl.rows_per_item
            for cat, value in inference_moment("reference", ref, wl, dev[ref.name], rows, wl.seq_len).items():
                add(m, ref.name, cat, value)
            phases["precompute reference"] = [m]
    else:
        policy = wl.role("policy")
        device = dev[policy.name]
        num = wl.numerics(device)
        s = policy.shape
        B = -(-wl.gen_batch // n)
        kv_bytes = num.act
        # under bf16 rlhfkit samples from a bf16 copy of the policy's fp32 weights (models/precision.bf16_weights);
        # under fp16 autocast keeps its casts of the policy's trained weights for the rollout
        if compute_mode(wl.mixed_precision, device) == "bf16":
            half_copy = fp32_bytes(policy, wl, device) // 2
        else:
            half_copy = autocast_cache_bytes(policy, wl, device)
        prefill, decode = base(), base()
        for m in (prefill, decode):
            add(m, policy.name, "weight copies", half_copy)  # of the whole weights, under FSDP too
            gather_whole(m)
        add(prefill, policy.name, "kv cache", mem.kv_cache_bytes(s, B, wl.prompt_len, kv_bytes))
        add(prefill, policy.name, "activations", mem.block_inference_transient(s, B, wl.prompt_len, num, "sdpa"))
        add(prefill, policy.name, "logits", 3 * B * s.vocab * 4)
        tokens = wl.prompt_len + wl.new_tokens
        add(decode, policy.name, "kv cache", mem.kv_cache_bytes(s, B, tokens, kv_bytes))
        add(decode, policy.name, "other", mem.decode_step_transient(s, B, tokens, kv_bytes))
        phases["generate"] = [prefill, decode]
        scoring = []
        rows = per_process(wl.score_batch, wl, n)
        roles = [r for r in ("policy", "reference", "critic", "reward model") if wl.role(r) is not None]
        if not wl.need_old_logprobs:
            roles.remove("policy")
        for role in roles:
            ws = wl.role(role)
            m = base()
            for cat, value in inference_moment(role, ws, wl, dev[ws.name], rows, wl.seq_len).items():
                add(m, ws.name, cat, value)
            # The trained models score inside the rollout's autocast context, on whole weights; a frozen model of
            # its own scores in a pass after it (trainers/rl_loop.py), once that context has closed (with its
            # casts of the trained weights) and FSDP has sharded the trained models again.
            own_pass = ws.trained == "frozen"
            for held in wl.weights:
                if not own_pass or held.trained == "frozen":
                    add(m, held.name, "weight copies", autocast_cache_bytes(held, wl, dev[held.name]))
            gather_whole(m, frozen=own_pass)
            scoring.append(m)
        phases["score"] = scoring
        policy_ws, critic_ws = wl.role("policy"), wl.role("critic")
        moments = []
        alive = {}
        if accumulating:
            alive[policy_ws.name] = grads(policy_ws)
            if critic_ws is not None:
                alive[critic_ws.name] = grads(critic_ws)
        moments += train_pass("policy", alive)
        if critic_ws is not None:
            after_policy = dict(alive)
            after_policy[policy_ws.name] = grads(policy_ws)
            moments += train_pass("critic", after_policy)
        phases["train"] = moments
    uses = {}
    for phase, moments in phases.items():
        per_device = []
        for i, d in enumerate(devices):
            worst = max(moments, key=lambda m: sum(m[i].values()))
            per_device.append(DeviceUse(d, phase, {k: v for k, v in worst[i].items()}))
        uses[phase] = per_device
    host = 0
    if wl.knobs.offload_optimizer:
        host = sum(mem.adam_state_bytes(trainable_params(ws, wl), param_bytes(ws, wl)) for ws in wl.weights)
    return Plan(wl, devices, placement, uses, host, activations)
