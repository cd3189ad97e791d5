"""bf16 copies of a model's weights, for frozen models under bf16 autocast and for sampling.

Which precision a stage runs in (and the autocast contexts) is runtime/precision.py's business.
"""

from __future__ import annotations

import contextlib

import torch


def store_linears_in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """For a frozen model that only ever runs under bf16 autocast: keep the weights autocast would cast anyway
    (those of `nn.Linear` layers) in bf16 once, instead of casting them again at every forward.

    Results are bitwise unchanged: autocast rounds an fp32 weight to bf16 exactly as this does. Autocast
    caches casts only for weights that require grad, so a frozen model otherwise pays the full cast (about
    60 ms for 135M parameters on 2 CPU cores) on every micro-batch, and it now takes half the memory.
    Embeddings and norms stay fp32 (autocast runs them in fp32), and so does the LM head, which rlhfkit
    applies in fp32 (see rollout/scoring.py), even when it is not tied to the embeddings.
    """
    keep = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in keep:
            module.to(torch.bfloat16)
    return model


def store_lora_base_in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """For a model trained through LoRA adapters under bf16 autocast: the frozen base layers under the adapters
    (each adapter's `base_layer`, an `nn.Linear`) keep their weights in bf16 once; the adapters, heads,
    embeddings and norms stay fp32.

    Results are bitwise unchanged, for the reason `store_linears_in_bf16` gives: every forward of the base runs
    under autocast, which rounds a frozen fp32 weight to bf16 exactly so, and casts it again at every forward
    (it caches casts only for weights that require grad). The base is also what every role of a LoRA PPO run
    shares (policy, reference, critic, a LoRA reward model): half its memory, and no cast per forward.
    """
    from rlhfkit.models.lora import lora_layers

    for layer in lora_layers(model):
        base = layer.get_base_layer()
        if isinstance(base, torch.nn.Linear) and not base.weight.requires_grad:
            base.to(torch.bfloat16)
    return model


@contextlib.contextmanager
def bf16_weights(model: torch.nn.Module):
    """Run `model` in plain bf16, without autocast, for inference (sampling); its fp32 weights come back exactly.

    Inside, every floating parameter is a bf16 copy and autocast is off. On exit the original tensors (not a round
    trip through bf16) are put back, so training never sees a rounded weight.

    Why: decoding one token runs ~40 small ops per layer, and under autocast each of them pays the autocast
    dispatch and the casts of its fp32 activations; plain bf16 decoding is the way inference engines (vLLM,
    as OpenRLHF and verl use it for rollouts) run a policy whose training keeps fp32 master weights. The LM head
    is bf16 too, as in those engines: it reads its whole weight (49152 x 576 for the embedded model) at every
    decoding step, half as many bytes in bf16, and its logits are upcast before sampling (rollout/scoring.py's
    `lm_head_logits`). The embedding lookup returns the bf16 rounding of the fp32 rows, as a cast of its fp32
    output would. Sampling from these weights is not scored: PPO's log-probs come from the scoring forward,
    whose head runs in fp32.
    """
    originals = {}
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype != torch.float32 or id(param) in originals:
                continue
            originals[id(param)] = (param, param.data)
            param.data = param.data.to(torch.bfloat16)
    try:
        with torch.autocast(device_type=model.get_input_embeddings().weight.device.type, enabled=False):
            yield model
    finally:
        for param, data in originals.values():
            param.data = data
