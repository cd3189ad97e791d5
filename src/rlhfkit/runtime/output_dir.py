"""Choosing and preparing a stage's output folder (only after its inputs were validated, so that a bad
input never leaves a half-made folder behind)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from rlhfkit.errors import UserError
from rlhfkit.runtime.checkpoint import list_checkpoints
from rlhfkit.runtime.distributed import processes


def resolve_output_dir(config, stage: str) -> Path:
    """The folder a stage writes to; refuses to silently mix a new run into an old run's checkpoints."""
    out = Path(config.output_dir or f"runs/{stage}")
    if getattr(config, "resume", False):
        return out
    if list_checkpoints(out):
        raise UserError(f"{out}: already holds checkpoints of an earlier run; pass --resume to continue it "
                        f"or choose another --output-dir")
    return out


def to_yaml(config) -> str:
    """A stage's resolved config (a dataclass) as the YAML a `--config` file takes."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def prepare_output_dir(out: Path, config) -> None:
    if not processes().main:  # several processes: the main one writes
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(config))


def save_hf_folder(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """A standard HF folder: config, safetensors weights, tokenizer, generation config. `state_dict`: the
    weights to write instead of the model's own (FSDP: the whole ones, gathered)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
