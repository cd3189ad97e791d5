"""Batch token-id lists into left-padded tensors.

Everything is padded on the LEFT so that the last column of every row is its last real token: generation
then continues all rows at the same column, and scoring reads responses at the same offsets.
Position ids count real tokens only (``cumsum(attention_mask) - 1``, clamped at 0), so a left-padded row
gets the same positions, and so the same logits, as the row alone without padding.
"""

from __future__ import annotations

import torch


def left_pad(sequences: list[list[int]], pad_id: int, extra: dict[str, list[list]] | None = None) -> dict:
    """Left-pad B sequences to the longest length T.

    Returns ``input_ids`` (B, T) long, padded with `pad_id`; ``attention_mask`` (B, T) long, 1 on real
    tokens; ``position_ids`` (B, T) long, 0 at each row's first real token (and on its pads). Each entry
    of `extra` (name -> B per-token lists, each as long as its sequence) comes back as a (B, T) tensor
    padded with 0 on the left, e.g. a loss mask.
    """
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    extra = extra or {}
    for name, rows in extra.items():
        if len(rows) != len(sequences) or any(len(r) != len(s) for r, s in zip(rows, sequences)):
            raise ValueError(f"extra '{name}' must match the sequences' lengths row by row")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    padded_extra = {name: torch.zeros((len(sequences), width), dtype=torch.long) for name in extra}
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
        for name, rows in extra.items():
            padded_extra[name][row, width - len(seq):] = torch.tensor(rows[row], dtype=torch.long)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            **padded_extra}


def collate_sft(batch: list[dict], pad_id: int) -> dict:
    """`tokenize_sft` outputs -> input_ids, attention_mask, position_ids, loss_mask, all (B, T) long;
    loss_mask is 0 on pads and prompt tokens."""
    return left_pad([ex["input_ids"] for ex in batch], pad_id,
                    extra={"loss_mask": [ex["loss_mask"] for ex in batch]})


def collate_pairs(batch: list[dict], pad_id: int) -> dict:
    """`tokenize_preference` outputs -> one (2B, T) batch: rows 0..B-1 are prompt+chosen, rows B..2B-1
    prompt+rejected (so row i and row B+i are a pair; one forward pass scores both).

    Returns input_ids, attention_mask, position_ids and response_mask (1 on response tokens, EOS
    included), all (2B, T) long; plus ``margin`` (B,) float when any example has one (0.0 where absent).
    """
    sequences, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for ex in batch:
            sequences.append(ex["prompt_ids"] + ex[side])
            masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[side]))
    out = left_pad(sequences, pad_id, extra={"response_mask": masks})
    if any("margin" in ex for ex in batch):
        out["margin"] = torch.tensor([float(ex.get("margin", 0.0)) for ex in batch], dtype=torch.float32)
    return out


def collate_prompts(prompt_ids_list: list[list[int]], pad_id: int) -> dict:
    """Prompts for generation -> input_ids, attention_mask, position_ids, all (B, P) long, left-padded."""
    return left_pad(prompt_ids_list, pad_id)
