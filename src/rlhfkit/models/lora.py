"""LoRA through peft: adapters on a frozen base, several roles on ONE base, adapter folders in peft's format.

With `lora_r > 0` a trained model is its frozen base plus a low-rank adapter per targeted linear layer
(Hu et al. 2021: W x + (alpha / r) * B A x, B initialised to zero, so a new adapter changes nothing).
PPO keeps one base in memory for four roles (models/roles.py): the policy (adapter "policy"), the reference
(adapters off: exactly the base, i.e. the SFT weights), the critic (adapter "critic" plus a value head).

Adapters are switched by setting peft's layer state directly. peft's own `set_adapter`/`enable_adapters` also
flip `requires_grad` (the inactive adapter is frozen), which would silently stop a role's gradients when
another role runs between its forward and its optimizer step; here each adapter stays trainable throughout,
and only the forward path changes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(config, *, score_head: bool = False):
    """peft's LoraConfig from a stage config's lora_* fields; `score_head`: the scalar head trains in full and is
    saved with the adapter (peft's modules_to_save), as for a reward model."""
    from peft import LoraConfig

    targets = config.lora_target_modules
    targets = "all-linear" if targets in (None, "", "all-linear") else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", modules_to_save=["score"] if score_head else None,
                      task_type="SEQ_CLS" if score_head else "CAUSAL_LM")


def _all_linear(model) -> list[str]:
    """Names of the trunk's linear layers (the LM head and a score head excluded), as peft's 'all-linear' picks."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    skip = {"lm_head", "score"}
    names = set()
    for name, module in model.named_modules():
        inside_adapter = ".lora_" in name or name.endswith("base_layer") or ".base_layer." in name
        if isinstance(module, BaseTunerLayer) or (isinstance(module, torch.nn.Linear) and not inside_adapter):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - skip)


def add_adapter(model, settings, name: str) -> None:
    """Inject adapter `name` (a LoraConfig) into `model` in place; the model keeps its class, so every code path
    that takes a plain HF model (the trunk as `model.base_model`, the LM head) takes it as it is. Only the
    adapter (and modules_to_save) require grad; the base is frozen."""
    from peft import inject_adapter_in_model

    if settings.target_modules == "all-linear" or settings.target_modules == {"all-linear"}:
        settings.target_modules = _all_linear(model)
    first = not lora_layers(model)
    before = name if first else active_adapter(model)
    if first:
        model.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns that a second adapter on one model is unusual: it is our design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(settings, model, adapter_name=name)
    # peft gives a new adapter its base layer's dtype: a base stored in bf16 (models.precision.
    # store_lora_base_in_bf16) would make a later adapter bf16. Adapters keep the model's own dtype (that of its
    # embeddings): fp32 weights for AdamW, as the first adapter has.
    dtype = model.get_input_embeddings().weight.dtype
    for module_name, param in model.named_parameters():
        if f".{name}." in module_name or module_name.endswith(f".{name}"):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
            param.requires_grad_(True)
    # A newly injected adapter becomes peft's active one: put the first one back as the default path.
    activate(model, before)


def lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def active_adapter(model) -> str | None:
    layers = lora_layers(model)
    if not layers:
        return None
    active = layers[0]._active_adapter
    return active[0] if isinstance(active, list) else active


def activate(model, name: str | None) -> None:
    """Route every LoRA layer through adapter `name` (None: no adapter, the base alone); grads untouched.

    Only LoRA layers switch: a model whose adapters take turns (the roles of models/roles.py) carries its heads
    outside peft, and a reward model's head trained in full (`modules_to_save`) belongs to its only adapter."""
    _route(lora_layers(model), name)


def _route(layers: list, name: str | None) -> None:
    for layer in layers:
        if name is None:
            layer._disable_adapters = True
        else:
            layer._active_adapter = [name]
            layer._disable_adapters = False


@contextlib.contextmanager
def using(model, name: str | None):
    """Within: the forward path of adapter `name` (None: the base alone); after: whatever was active before."""
    layers = lora_layers(model)  # one walk over the modules per forward, not two
    before = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    _route(layers, name)
    try:
        yield model
    finally:
        for layer, (active, disabled) in zip(layers, before):
            layer._active_adapter, layer._disable_adapters = active, disabled


@contextlib.contextmanager
def merged_weights(model, name: str):
    """Within: every LoRA layer that has adapter `name` runs as one plain linear layer, its base weight replaced
    by W + (alpha / r) B A (peft's delta, added in fp32 and rounded once to the base weight's dtype), with the
    adapters off; after: the very same weight tensors as before (not a round trip) and the routing as before.
    Yields whether it merged (else adapter `name` is routed as it is, see below).

    For fp32 sampling, whose forwards are not scored (PPO's log-probs come from the unmerged scoring forward): a
    decoding step then runs one matmul per layer instead of adding each adapter's two rank-r matmuls and a scaled
    sum. It holds one merged copy of the adapted weights meanwhile. The adapters run as they are (nothing is
    merged) where a base weight is not fp32: a bf16 base weight sits on bf16's grid, and W + delta rounded to it
    is exactly W wherever the delta is under half a unit in the last place (early in training, nearly
    everywhere), so the rollout would sample from a policy pulled back towards the base while scoring adds the
    adapter's output in full. Nor under FSDP, whose gathered weights belong to FSDP."""
    from torch.distributed.fsdp import FSDPModule

    layers = [layer for layer in lora_layers(model) if name in getattr(layer, "lora_A", {})]
    if any(isinstance(m, FSDPModule) for m in model.modules()) or \
            any(layer.get_base_layer().weight.dtype != torch.float32 for layer in layers):
        with using(model, name):
            yield False
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = layer.get_delta_weight(name)
                originals.append((weight, weight.data))
                weight.data = (weight.data.float() + delta.float()).to(weight.dtype)
        with using(model, None):
            yield True
    finally:
        for weight, data in originals:
            weight.data = data


def adapter_state(model, name: str, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under the keys peft's PeftModel writes (prefix `base_model.model.`), taken from
    `state_dict` when given (FSDP: the whole weights, gathered) or from the model."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name)
    return {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}


def save_adapter(model, name: str, folder: Path, base_path: str, state_dict: dict | None = None) -> None:
    """Adapter `name` as a peft folder (adapter_config.json + adapter_model.safetensors), which
    `PeftModel.from_pretrained(base, folder)` loads; `base_path` goes into its config as the base model.
    `state_dict`: the model's weights to take it from instead of the model's own (see adapter_state)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = copy.deepcopy(model.peft_config[name])
    settings.base_model_name_or_path = str(base_path)
    settings.inference_mode = True
    settings.save_pretrained(str(folder))
    save_file(adapter_state(model, name, state_dict), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_folder(path) -> bool:
    return path is not None and Path(str(path), ADAPTER_CONFIG).is_file()


def adapter_base(folder) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json's base_model_name_or_path)."""
    return json.loads(Path(folder, ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def merge_adapter_folder(base_model, folder) -> torch.nn.Module:
    """`base_model` with the adapter of `folder` merged into its weights (W + (alpha/r) B A): a plain model again."""
    from peft import PeftConfig, PeftModel

    settings = PeftConfig.from_pretrained(str(folder))
    if settings.task_type == "CAUSAL_LM" and not hasattr(base_model, "prepare_inputs_for_generation"):
        # An SFT adapter merged into a reward model's trunk (a reward stage started from a LoRA SFT folder): peft's
        # causal-LM wrapper would need a generating model; the plain one applies the same layers.
        settings.task_type = None
    peft_model = PeftModel.from_pretrained(base_model, str(folder), config=settings, is_trainable=False)
    return peft_model.merge_and_unload()


def load_adapter_weights(model, name: str, folder) -> None:
    """Adapter `name`'s tensors from a folder written by `save_adapter` into `model` (a resumed run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder}: adapter weights that match no layer: {unexpected[:3]}")


def attach_adapter_folder(model, folder, name: str, trainable: bool = False) -> dict[str, torch.Tensor]:
    """Load the adapter of `folder` onto `model` as one more adapter `name` (frozen unless `trainable`), and
    return the tensors it carries beyond the adapter, by module path (a reward model's `score.weight`). A reward
    model trained with LoRA on the policy's base thus scores on that same base: its trunk adapter fits the
    causal LM's trunk, whose modules have the same paths."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    settings = LoraConfig.from_pretrained(str(folder))
    settings.modules_to_save = None
    settings.inference_mode = False
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(Path(folder) / ADAPTER_WEIGHTS)).items()}
    extra = {k: v for k, v in state.items() if ".lora_" not in k}
    add_adapter(model, settings, name)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: v for k, v in state.items() if k not in extra}, adapter_name=name)
    for key, param in model.named_parameters():
        if f".{name}." in key:
            param.requires_grad_(trainable)
    return extra
