"""What would make a plan fit: the smallest sets of changes (checkpointing, a smaller micro-batch, half-precision
frozen copies, LoRA, FSDP, frozen models sharded under FSDP, spreading models, CPU offload), each re-planned with
plan.layout.plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

from rlhfkit.plan.devices import Device
from rlhfkit.plan.layout import Plan, plan
from rlhfkit.plan.workload import WeightSet, Workload

@dataclass
class Suggestion:
    changes: list[str]        # in words, with the config keys to set
    plan: Plan
    cost: int


def _micro_options(micro: int) -> list[int]:
    out, m = [], micro
    while m > 1:
        m //= 2
        out.append(max(m, 1))
    return out


def suggest(wl: Workload, devices: list[Device], limit: int = 3) -> list[Suggestion]:
    """The smallest changes that make the plan fit, cheapest first: single changes before pairs, pairs before
    triples, each set minimal (no part of it fits alone). A change's cost ranks how much it asks: checkpointing
    and a smaller micro-batch change only speed; half-precision frozen copies round frozen weights, and sharding
    the frozen models under FSDP adds an all-gather per rollout; LoRA changes what is trained; FSDP or spreading
    models needs several processes or devices; CPU offload is slowest."""
    k = wl.knobs
    gpus = [d for d in devices if not d.is_cpu]
    options: list[tuple[str, int]] = []
    if not k.gradient_checkpointing:
        options.append(("checkpointing", 1))
    if k.micro_batch > 1:
        options.append(("micro-batch", 1))
    if not k.frozen_half and (any(w.trained != "full" for w in wl.weights) or k.lora_r == 0):
        options.append(("half frozen", 2))  # with LoRA, the shared base is frozen too
    if k.lora_r == 0:
        options.append(("lora", 4))
    if len(gpus) > 1 and k.layout != "fsdp":
        options.append(("fsdp", 5))
    if (len(gpus) > 1 and not k.shard_frozen and wl.stage in ("ppo", "grpo", "rloo")
            and any(w.trained == "frozen" for w in wl.weights)):
        options.append(("shard frozen", 2))  # only under FSDP: with the layout, or with the "fsdp" change
    if len(gpus) > 1 and k.layout == "single" and len(wl.weights) > 1:
        options.append(("spread", 5))
    if gpus and not k.offload_optimizer:
        options.append(("offload", 6))
    found: list[Suggestion] = []
    fitting_sets: list[set[str]] = []
    for size in range(1, len(options) + 1):
        for combo in sorted(combinations(options, size), key=lambda c: sum(x[1] for x in c)):
            names = {name for name, _ in combo}
            if "fsdp" in names and "spread" in names:
                continue
            if "shard frozen" in names and "fsdp" not in names and k.layout != "fsdp":
                continue
            if any(s <= names for s in fitting_sets):
                continue
            result = _try(wl, devices, names)
            if result is not None:
                fitting_sets.append(names)
                found.append(Suggestion(result[0], result[1], sum(c for _, c in combo)))
    found.sort(key=lambda s: (s.cost, len(s.changes)))
    return found[:limit]


def _try(wl: Workload, devices: list[Device], names: set[str]):
    k = wl.knobs
    changes = []
    if "checkpointing" in names:
        k = replace(k, gradient_checkpointing=True)
    if "half frozen" in names:
        k = replace(k, frozen_half=True)
    if "lora" in names:
        k = replace(k, lora_r=16)
    if "fsdp" in names:
        k = replace(k, layout="fsdp")
    if "shard frozen" in names:
        k = replace(k, shard_frozen=True)
    if "spread" in names:
        k = replace(k, layout="spread")
    if "offload" in names:
        k = replace(k, offload_optimizer=True)
    micros = _micro_options(k.micro_batch) if "micro-batch" in names else [k.micro_batch]
    for micro in micros:
        trial = replace(wl, knobs=replace(k, micro_batch=micro), accumulation=max(1, -(-wl.mini_batch // micro)))
        if "lora" in names:
            trial = _with_lora(trial)
        p = plan(trial, devices)
        if p.fits:
            return [describe_change(name, trial, len(devices)) for name in sorted(names, key=_ORDER.index)], p
    return None


_ORDER = ["checkpointing", "micro-batch", "half frozen", "lora", "fsdp", "shard frozen", "spread", "offload"]


def _with_lora(wl: Workload) -> Workload:
    """The same workload with LoRA: one frozen base for the policy, the reference and the critic."""
    weights = list(wl.weights)
    shared = [w for w in weights if set(w.serves) & {"policy", "reference", "critic"}]
    if wl.stage == "reward":
        w = weights[0]
        return replace(wl, weights=(replace(w, trained="lora", adapters=("reward model",), value_head=True),))
    if not shared:
        return wl
    base_shape = next(w.shape for w in shared if "policy" in w.serves)
    serves = tuple(r for w in shared for r in w.serves)
    adapters = tuple(r for r in ("policy", "critic") if r in serves)
    label = "base (" + ", ".join(a + " adapter" for a in adapters) + (
        "; reference = adapters off)" if "reference" in serves else ")")
    base = WeightSet(label, base_shape, True, "lora", serves, adapters=adapters, value_head="critic" in serves)
    rest = [w for w in weights if w not in shared]
    return replace(wl, weights=(base, *rest))


def describe_change(name: str, wl: Workload, n_devices: int) -> str:
    k = wl.knobs
    if name == "checkpointing":
        return "gradient_checkpointing: true"
    if name == "micro-batch":
        if wl.stage in ("sft", "reward", "dpo"):
            return (f"batch_size: {k.micro_batch}, gradient_accumulation_steps: {wl.accumulation} "
                    f"(same {wl.mini_batch} per optimizer step)")
        return f"gradient_accumulation_steps: {wl.accumulation} (micro-batch {k.micro_batch} of {wl.mini_batch})"
    if name == "half frozen":
        return "frozen models in fp16/bf16 (what-if: no setting yet)"
    if name == "lora":
        return f"lora_r: {k.lora_r} (one frozen base, adapters trained)"
    if name == "fsdp":
        return f"FSDP over {n_devices} processes (torchrun, distributed: fsdp)"
    if name == "shard frozen":
        return "fsdp_frozen: shard (the reference and reward model sharded too, gathered whole only to score)"
    if name == "spread":
        return "one model per device (what-if: rlhfkit runs one device per stage)"
    if name == "offload":
        return "optimizer state in host memory (what-if: CPU offload, not in rlhfkit)"
    return name

