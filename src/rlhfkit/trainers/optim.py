"""AdamW with decay only on matrices, and a warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch

from rlhfkit.models.parallel import is_sharded


def param_groups(named_params, weight_decay: float, lr: float, lr_overrides: dict[str, float] | None = None):
    """Split trainable parameters into groups: no weight decay for biases and norm weights (1-D tensors),
    as in GPT-2/BERT practice; parameters whose name starts with a key of `lr_overrides` get that lr. FSDP's
    sharded parameters (DTensors) and plain ones (a LoRA critic's head beside its sharded base) go into separate
    groups: the fused AdamW kernel takes one kind at a time."""
    groups: dict[tuple[float, float, bool], list] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        decay = weight_decay if param.ndim >= 2 else 0.0
        group_lr = lr
        for prefix, override in (lr_overrides or {}).items():
            if name.startswith(prefix):
                group_lr = override
        groups.setdefault((decay, group_lr, is_sharded(param)), []).append(param)
    return [{"params": ps, "weight_decay": d, "lr": glr} for (d, glr, _), ps in groups.items()]


def build_optimizer(model, config, lr_overrides: dict[str, float] | None = None,
                    lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters with the config's settings; `lr` overrides its learning rate."""
    lr = config.learning_rate if lr is None else lr
    groups = param_groups(model.named_parameters(), config.weight_decay, lr, lr_overrides)
    # The fused kernel (CPU and CUDA since torch 2.4) updates 135M parameters about 4x faster than the
    # per-parameter loop on a 2-core CPU (0.09 s against 0.38 s) and keeps no extra copies, unlike foreach.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, fused=fused or None, foreach=False if not fused else None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine/linear/none."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(config.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.lr_scheduler))


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_`, bit for bit, without its multiply when it would scale by exactly 1.

    clip_grad_norm_ always rescales every gradient by min(1, max_norm / (norm + 1e-6)); when that factor is 1
    the pass over all gradients (two models' worth in PPO) changes nothing and only costs memory traffic.
    Returns the total norm before clipping (inf or nan when a gradient is not finite).
    """
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if is_sharded(g)]
    if sharded and len(sharded) < len(grads):
        return _clip_mixed(sharded, [g for g in grads if not is_sharded(g)], max_norm)
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if float(max_norm) / (float(norm) + 1e-6) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def _clip_mixed(sharded: list[torch.Tensor], plain: list[torch.Tensor], max_norm: float) -> float:
    """FSDP's sharded gradients (DTensors) beside plain ones (a LoRA critic's value head, outside the sharded
    base): torch's foreach kernels take one kind at a time, so the norms are taken apart and combined."""
    whole = torch.nn.utils.get_total_norm(sharded, 2.0).full_tensor()  # every process's shards
    norm = float(torch.linalg.vector_norm(torch.stack([whole, torch.nn.utils.get_total_norm(plain, 2.0)])))
    scale = float(max_norm) / (norm + 1e-6)
    if scale < 1.0:
        for g in (*sharded, *plain):
            g.mul_(scale)
    return norm
