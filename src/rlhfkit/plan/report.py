"""The plan as a text table for people and as JSON for programs (`--json`): the same numbers."""

from __future__ import annotations

from dataclasses import replace

from rlhfkit.plan.devices import Device, describe
from rlhfkit.plan.layout import CATEGORIES, Plan, frozen_sharded, is_sharded, plan
from rlhfkit.plan.suggest import Suggestion, suggest
from rlhfkit.plan.workload import Workload, compute_mode

GIB = 2**30
LAYOUT_WORDS = {"single": "every model on one device", "spread": "one model per device",
                "fsdp": "one process per device; trained models sharded (FSDP), frozen ones whole on each"}


def _layout_words(wl: Workload) -> str:
    if frozen_sharded(wl):
        return "one process per device; trained and frozen models sharded (FSDP, fsdp_frozen: shard)"
    return LAYOUT_WORDS[wl.knobs.layout]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def other_layouts(wl: Workload, devices: list[Device]) -> dict[str, Plan]:
    """The same settings in the other layouts that the devices allow."""
    gpus = [d for d in devices if not d.is_cpu]
    out = {}
    for layout in ("single", "spread", "fsdp"):
        if layout == wl.knobs.layout or (layout != "single" and len(gpus) < 2):
            continue
        if layout == "spread" and len(wl.weights) < 2:
            continue
        out[layout] = plan(replace(wl, knobs=replace(wl.knobs, layout=layout)), devices)
    return out


def _where(devices: list[Device], indices: list[int], sharded: bool = True) -> str:
    """The devices a model is on; on several, sharded over them (FSDP) or whole on each (a frozen model)."""
    if len(indices) == 1:
        return devices[indices[0]].label
    how = f"sharded: 1/{len(indices)} on each" if sharded else "whole on each"
    kinds = {devices[i].kind for i in indices}
    if len(kinds) == 1 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"cuda:{indices[0]}..{indices[-1]} ({kinds.pop()}), {how}"
    return ", ".join(devices[i].label for i in indices) + f", {how}"


def _used(p: Plan) -> list[int]:
    held = {i for indices in p.placement.values() for i in indices}
    return sorted(held)


def _precision_words(wl: Workload, device: Device) -> str:
    mode = compute_mode(wl.mixed_precision, device)
    dtype = "bf16" if wl.dtype_bytes == 2 else "fp32"
    if mode == "fp32":
        return f"fp32 (weights {dtype})"
    why = "" if mode == "bf16" or device.is_cpu else f"; {device.kind} has no bf16, so fp16 with a loss scaler"
    return f"{mode} autocast (weights {dtype}{why})"


def summary_line(p: Plan) -> str:
    i = p.worst_device()
    peak = p.peak(i)
    d = p.devices[i]
    return (f"{p.status(i)}: {d.label} peaks at {_gib(peak.total)} GiB in '{peak.phase}' "
            f"(usable {_gib(d.usable_bytes)} GiB)")


def _groups(p: Plan, used: list[int]) -> list[list[int]]:
    """Devices whose every phase holds the same bytes (FSDP's shards) share one column group."""
    groups: list[list[int]] = []
    for i in used:
        key = [(ph, uses[i].parts) for ph, uses in p.phases.items()]
        for g in groups:
            j = g[0]
            if p.devices[j].kind == p.devices[i].kind and key == [(ph, uses[j].parts) for ph, uses in p.phases.items()]:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def memory_table(p: Plan, used: list[int]) -> list[str]:
    """Rows: kinds of memory; columns: each phase's peak moment on each device (GiB, or MiB when all is small)."""
    phases = list(p.phases)
    small = max(p.peak(i).total for i in used) < GIB
    unit = "MiB" if small else "GiB"

    def fmt(n: int) -> str:
        return f"{n / 2**20:.1f}" if small else _gib(n)

    lines = [f"memory per device and phase ({unit}; each column is the phase's peak moment on that device):"]
    for group in _groups(p, used):
        i = group[0]
        d = p.devices[i]
        name = d.label if len(group) == 1 else (
            f"cuda:{group[0]}..{group[-1]} ({d.kind}, each)" if not d.is_cpu else d.label)
        roles = [ws.name for ws in p.workload.weights if i in p.placement[ws.name]]
        lines.append(f"  {name}: {', '.join(roles)}")
        width = max(10, *(len(ph) + 2 for ph in phases))
        lines.append(f"    {'':<16}" + "".join(f"{ph:>{width}}" for ph in phases))
        uses = [p.phases[ph][i] for ph in phases]
        for cat in CATEGORIES:
            values = [u.parts.get(cat, 0) for u in uses]
            if cat in ("weight copies", "other") and not any(values):
                continue
            lines.append(f"    {cat:<16}" + "".join(f"{fmt(v):>{width}}" for v in values))
        lines.append(f"    {'total':<16}" + "".join(f"{fmt(u.total):>{width}}" for u in uses))
        peak = p.peak(i)
        lines.append(f"    usable {_gib(d.usable_bytes)} GiB; peak {_gib(peak.total)} GiB in '{peak.phase}': "
                     f"{p.status(i)}")
    return lines


def render_text(p: Plan, suggestions: list[Suggestion], others: dict[str, Plan]) -> str:
    wl, devices = p.workload, p.devices
    k = wl.knobs
    shape = wl.weights[0].shape
    lines = [f"rlhfkit plan: {wl.stage} on {shape.name} ({shape.params / 1e9:.3g}B parameters), "
             f"{describe(devices)}",
             f"layout: {k.layout} ({_layout_words(wl)}); precision: {_precision_words(wl, devices[0])}; "
             f"attention: {wl.attn}; gradient checkpointing: {'on' if k.gradient_checkpointing else 'off'}"
             + (f"; LoRA r={k.lora_r}" if k.lora_r else "")]
    rows = k.micro_batch * wl.rows_per_item
    n = len(devices) if k.layout == "fsdp" else 1
    share = (lambda items: f" ({-(-items // n)} per process)") if n > 1 else (lambda items: "")
    batch = (f"micro-batch {k.micro_batch}" + (f" pairs ({rows} rows)" if wl.rows_per_item == 2 else "")
             + f"{share(k.micro_batch)} x {wl.seq_len} tokens, {wl.accumulation} per optimizer step")
    if wl.gen_batch:
        batch += (f"; generation {wl.gen_batch}{share(wl.gen_batch)} x ({wl.prompt_len} prompt + {wl.new_tokens} "
                  f"new) tokens; scoring {wl.score_batch}{share(wl.score_batch)} per forward")
    lines.append(batch)
    lines.append("")
    lines.append("where each model goes:")
    for ws in wl.weights:
        trained = {"full": "trained (full)", "lora": f"frozen, LoRA adapters trained ({', '.join(ws.adapters)})",
                   "frozen": "frozen"}[ws.trained]
        kind = "causal LM" if ws.lm_head else "trunk + scalar head"
        what = f"{ws.shape.name} {kind}, {trained} -> {_where(devices, p.placement[ws.name], is_sharded(ws, wl))}"
        lines.append(f"  {ws.name:<14} {what}" if len(ws.name) <= 14 else f"  {ws.name}\n  {'':<14} {what}")
    used = _used(p)
    idle = [devices[i].label for i in range(len(devices)) if i not in used]
    lines.append("")
    lines.extend(memory_table(p, used))
    if idle:
        lines.append(f"  idle: {', '.join(idle)}")
    lines.append("")
    for role, acts in p.activations.items():
        other = [key for key in acts if key != "saved"][0]
        lines.append(f"{role} activations of one micro-batch: {_gib(acts['saved'])} GiB "
                     f"({other}: {_gib(acts[other])} GiB)")
    if p.host_bytes:
        lines.append(f"host memory for the offloaded optimizer state: {_gib(p.host_bytes)} GiB")
    for name, other in others.items():
        lines.append(f"layout {name}: {summary_line(other)}")
    lines.append("")
    lines.append(("FITS. " if p.fits else "DOES NOT FIT. ") + summary_line(p))
    if not p.fits:
        if suggestions:
            lines.append("smallest changes that make it fit (each re-planned):")
            for n, s in enumerate(suggestions, 1):
                lines.append(f"  {n}. {' + '.join(s.changes)} -> {summary_line(s.plan)}")
        else:
            lines.append("no combination of checkpointing, a smaller micro-batch, half-precision frozen copies, "
                         "LoRA, FSDP or CPU offload fits these devices")
    for note in wl.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plan_json(p: Plan, suggestions: list[Suggestion], others: dict[str, Plan]) -> dict:
    wl = p.workload

    def device_table(q: Plan) -> list[dict]:
        out = []
        for i, d in enumerate(q.devices):
            peak = q.peak(i)
            out.append({"device": d.label, "kind": d.kind, "usable_bytes": d.usable_bytes,
                        "peak_bytes": peak.total, "peak_phase": peak.phase, "status": q.status(i),
                        "peak_parts": peak.parts,
                        "phases": {phase: {"total": uses[i].total, **uses[i].parts}
                                   for phase, uses in q.phases.items()}})
        return out

    return {
        "stage": wl.stage,
        "layout": wl.knobs.layout,
        "precision": compute_mode(wl.mixed_precision, p.devices[0]),
        "attention": wl.attn,
        "settings": {"micro_batch": wl.knobs.micro_batch,
                     "rows_per_micro_batch": wl.knobs.micro_batch * wl.rows_per_item,
                     "seq_len": wl.seq_len, "accumulation": wl.accumulation, "mini_batch": wl.mini_batch,
                     "gradient_checkpointing": wl.knobs.gradient_checkpointing, "lora_r": wl.knobs.lora_r,
                     "frozen_half": wl.knobs.frozen_half, "offload_optimizer": wl.knobs.offload_optimizer,
                     "shard_frozen": frozen_sharded(wl),
                     "generation_batch": wl.gen_batch, "prompt_len": wl.prompt_len, "new_tokens": wl.new_tokens,
                     "score_batch": wl.score_batch},
        "models": [{"name": ws.name, "shape": ws.shape.to_dict(), "causal_lm": ws.lm_head, "trained": ws.trained,
                    "serves": list(ws.serves), "adapters": list(ws.adapters),
                    "devices": [p.devices[i].label for i in p.placement[ws.name]]} for ws in wl.weights],
        "devices": device_table(p),
        "activations": p.activations,
        "host_bytes": p.host_bytes,
        "fits": p.fits,
        "summary": summary_line(p),
        "other_layouts": {name: {"fits": q.fits, "summary": summary_line(q), "devices": device_table(q)}
                          for name, q in others.items()},
        "suggestions": [{"changes": s.changes, "fits": s.plan.fits, "summary": summary_line(s.plan),
                         "peak_bytes": max(s.plan.peak(i).total for i in range(len(s.plan.devices)))}
                        for s in (suggestions if not p.fits else [])],
        "notes": list(wl.notes),
    }


def full_report(wl: Workload, devices: list[Device]) -> tuple[Plan, list[Suggestion], dict[str, Plan]]:
    p = plan(wl, devices)
    return p, ([] if p.fits else suggest(wl, devices)), other_layouts(wl, devices)
