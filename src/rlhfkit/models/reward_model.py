"""Reward (and value) models: the LM trunk plus a scalar head, read at the last non-pad token.

We use transformers' `AutoModelForSequenceClassification` with `num_labels=1` as the container: started from a
causal-LM folder it keeps the trunk and adds a fresh linear `score` head, and the folder it saves loads back
in transformers (and in vLLM as a reward model) with no code of ours. We compute the score ourselves,
applying the head only to the last real token's hidden state, from the attention mask, so left padding,
right padding and pad == EOS all give the same answer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.core.positions import last_token_index, position_ids_from_mask
from rlhfkit.data.length_buckets import bucket_overhead, forward_in_buckets
from rlhfkit.errors import UserError
from rlhfkit.models import lora
from rlhfkit.models.loading import (merge_adapter, attention_kernel, disable_dropout, first_line, load_errors,
                                   own_memory, resolve_model_path, torch_dtype)
from rlhfkit.models.safety import check_loaded_weights, check_model_folder


def load_reward_model(path: str | Path | None, pad_token_id: int, dtype: str = "float32",
                      trust_remote_code: bool = False, attn_implementation: str = "auto", device: str = "cpu"):
    """A scalar-head model from a reward-model folder, or a fresh head on a causal-LM folder's trunk, on `device`."""
    from transformers import AutoModelForSequenceClassification

    folder = resolve_model_path(None if path is None else str(path))
    if lora.is_adapter_folder(folder):  # trained with LoRA: the base's trunk, adapter and score head merged
        base = load_reward_model(lora.adapter_base(folder), pad_token_id, dtype, trust_remote_code, attn_implementation,
                                 device)
        return merge_adapter(base, folder)
    check_model_folder(folder, trust_remote_code)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True, attn_implementation=attention_kernel(attn_implementation),
            output_loading_info=True, ignore_mismatched_sizes=True)
    except load_errors() as exc:
        raise UserError(f"{folder}: cannot load as a reward model: {first_line(exc)}") from exc
    # The scalar head is new when the folder holds a causal LM: its absence is expected.
    check_loaded_weights(folder, info, may_be_missing=("score.",))
    if not hasattr(model, "score"):
        raise UserError(f"{folder}: {type(model).__name__} has no scalar 'score' head; use a decoder-only LM")
    # Used by transformers' own pooling when others load our folder; keep it right.
    model.config.pad_token_id = pad_token_id
    disable_dropout(model)
    return own_memory(model.to(device))


def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar score per sequence. input_ids, attention_mask: (B, T) -> (B,) float32. Rows of similar length are
    scored together, each bucket without its pad columns (data/length_buckets)."""
    if position_ids is None:  # count real tokens only, so that cropping pad columns moves no position
        position_ids = position_ids_from_mask(attention_mask)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return forward_in_buckets(lambda sub: _score(model, sub), batch, bucket_overhead(model))


def _score(model, batch: dict) -> torch.Tensor:
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"]).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(batch["attention_mask"])]  # (B, H)
    return model.score(last).squeeze(-1).float()  # (B,)
