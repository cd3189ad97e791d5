"""What a model folder must pass before transformers reads anything from it.

A model folder is user input like a data file, and a hostile one can run code in two ways: pickled weights
(`pytorch_model.bin`, `*.pt`: unpickling calls whatever the file names) and custom modelling code
(`auto_map` in config.json or tokenizer_config.json, imported when trust_remote_code is on). So weights are
read only from safetensors files, and a folder that asks for its own code is refused unless the user passed
--trust-remote-code. Every refusal is a one-line `UserError` naming the folder and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.errors import UserError

# Weight files that only torch.load (pickle) reads; we never open them.
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Files that point transformers at Python code shipped inside the folder.
CODE_POINTERS = ("config.json", "tokenizer_config.json")


def read_json_file(path: Path) -> dict:
    """A JSON object file of a model folder, or a one-line error (transformers' own is an OSError traceback)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def refuse_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose config asks for its own Python code, unless the user trusts it.

    Without this, transformers quietly falls back to its built-in class when config.json also names a known
    model_type: nothing runs, but the model may not be the one its author meant."""
    if trust_remote_code:
        return
    for name in CODE_POINTERS:
        path = folder / name
        if not path.is_file():
            continue
        auto_map = read_json_file(path).get("auto_map")
        if auto_map:
            target = next(iter(auto_map.values())) if isinstance(auto_map, dict) else auto_map
            if isinstance(target, (list, tuple)):
                target = next((t for t in target if t), target)
            raise UserError(f"{path}: asks to run Python code from the model folder (auto_map: {target}); "
                            f"rlhfkit runs none unless you pass --trust-remote-code")


def require_safetensors(folder: Path) -> None:
    """Weights must be safetensors; a folder with only pickled weights is refused, never unpickled."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise UserError(f"{folder}: only pickled weights ({pickled[0]}), which rlhfkit never loads since "
                        f"unpickling can run code; convert them to model.safetensors")
    raise UserError(f"{folder}: no *.safetensors weights in this model folder")


def check_model_folder(folder: Path, trust_remote_code: bool, need_weights: bool = True) -> None:
    """Everything above, before transformers opens a file of `folder` (a model folder, or a LoRA adapter folder
    written by a stage trained with --lora-r, which names its base in adapter_config.json)."""
    adapter = not (folder / "config.json").exists() and (folder / "adapter_config.json").is_file()
    read_json_file(folder / ("adapter_config.json" if adapter else "config.json"))
    refuse_remote_code(folder, trust_remote_code)
    if need_weights:
        require_safetensors(folder)


def check_loaded_weights(folder: Path, info: dict, may_be_missing: tuple[str, ...] = ()) -> None:
    """Refuse weights that do not fit the architecture config.json describes.

    `info` is transformers' `output_loading_info`. A mismatched shape or a parameter absent from the files
    would otherwise be freshly initialised at random (transformers only logs it): a model that loads and is
    silently wrong. `may_be_missing`: name prefixes a caller initialises on purpose (a reward model's head)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise UserError(f"{folder}: the weights do not match config.json: '{key}' has shape {list(stored)} in "
                        f"the safetensors file but config.json implies {list(expected)}"
                        + (f" ({len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(may_be_missing))
    if missing:
        raise UserError(f"{folder}: the safetensors files lack {len(missing)} weight(s) that config.json's "
                        f"architecture needs (first: '{missing[0]}'); is config.json from another model?")
