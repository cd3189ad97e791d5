"""Saving and reloading a trained model, full or LoRA, in the folder formats users load elsewhere.

- Full fine-tuning: a standard HF folder (`save_pretrained`), as before.
- LoRA: a peft adapter folder (adapter_config.json + adapter_model.safetensors, which
  `PeftModel.from_pretrained(base, folder)` loads) with the tokenizer; a critic's value head beside it in
  value_head.safetensors; with `merge`, also `merged/`, the base with the adapter merged in (a plain HF folder).
Every stage that takes a model folder takes either (models/loading.py merges an adapter folder on load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.runtime.distributed import processes
from rlhfkit.models import lora
from rlhfkit.models.precision import store_lora_base_in_bf16
from rlhfkit.models.roles import Role
from rlhfkit.runtime.checkpoint import load_model_weights
from rlhfkit.runtime.output_dir import save_hf_folder

VALUE_HEAD = "value_head.safetensors"


def adapter_of(model) -> tuple[torch.nn.Module, str] | None:
    """(base, adapter name) of a LoRA-trained model or role; None for a fully trained model."""
    if isinstance(model, Role):
        return model.shared_base, model.adapter
    if lora.lora_layers(model):
        return model, lora.active_adapter(model) or "default"
    return None


def save_trained(model, tokenizer, folder: Path, base: str | None = None, state_dict: dict | None = None) -> None:
    """`model` into `folder`: an HF folder, or (LoRA) an adapter folder whose config names `base` (see base_path).
    `state_dict`: the weights to write instead of the model's own (FSDP: the whole ones, gathered; for a role, its
    base's)."""
    folder = Path(folder)
    found = adapter_of(model)
    if found is None:
        save_hf_folder(model, tokenizer, folder, state_dict)
        return
    shared, name = found
    lora.save_adapter(shared, name, folder, base, state_dict)
    tokenizer.save_pretrained(folder)
    if isinstance(model, Role) and hasattr(model, "score"):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in model.score.state_dict().items()}, str(folder / VALUE_HEAD))


def load_trained_weights(model, folder: Path) -> None:
    """Weights saved by `save_trained` back into the same `model` (a resumed run)."""
    folder = Path(folder)
    found = adapter_of(model)
    if found is None:
        load_model_weights(model, folder)
        return
    base, name = found
    lora.load_adapter_weights(base, name, folder)
    if isinstance(model, Role) and hasattr(model, "score"):
        from safetensors.torch import load_file

        model.score.load_state_dict(load_file(str(folder / VALUE_HEAD)))


def uses_lora(config) -> bool:
    return getattr(config, "lora_r", 0) > 0


def with_lora(model, config, name: str = "default", score_head: bool = False):
    """`model` with a fresh LoRA adapter `name` when the config asks for LoRA (its base then frozen); as it is
    otherwise. `score_head`: a reward model's scalar head trains in full and is saved with the adapter.
    Under bf16 autocast the frozen base layers are stored in bf16 (models.precision.store_lora_base_in_bf16),
    except when FSDP will shard the model: it gathers a layer's weights and adapters as one group."""
    if uses_lora(config):
        lora.add_adapter(model, lora.lora_config(config, score_head=score_head), name)
        fsdp = getattr(config, "distributed", "ddp") == "fsdp" and processes().many
        if getattr(config, "mixed_precision", "no") == "bf16" and not fsdp:
            store_lora_base_in_bf16(model)
    return model


def base_path(config) -> str:
    """What an adapter trained from config.model names as its base: the resolved folder (absolute)."""
    from rlhfkit.models.loading import resolve_model_path

    return str(Path(resolve_model_path(config.model)).resolve())


def write_merged(folder: Path, tokenizer, fresh_base) -> None:
    """`folder/merged`: a fresh copy of the base with the adapter saved in `folder` merged in (`merge: true`);
    by the main process only, when there are several."""
    if not processes().main:
        return
    save_hf_folder(lora.merge_adapter_folder(fresh_base(), folder), tokenizer, Path(folder) / "merged")
