"""Tiny random-initialised causal LMs built in code, with the embedded model's real tokenizer.

Used by tests and the `tiny` preset: a Llama with hidden size 64 and 2 layers runs a training step in
milliseconds on a CPU, yet goes through exactly the code paths of a real model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TINY_NAME = "tiny-llama-h64-l2-v1"


def tiny_config(vocab_size: int, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, attention_dropout=0.0,
    )


def build_tiny_model(tokenizer, seed: int = 0):
    """A freshly initialised tiny Llama whose vocabulary matches `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def ensure_tiny(load_tokenizer) -> Path:
    """The tiny model as a folder in the cache (made once, atomically), so it loads like any model.
    `load_tokenizer()` gives the embedded model's tokenizer (models/loading.py passes it in: tiny.py sits below
    the loader and does not import it)."""
    from rlhfkit.models.embedded import cache_root

    target = cache_root() / TINY_NAME
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tiny-") as tmp:
        out = Path(tmp) / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target
