"""Index helpers for padded batches (left or right padding alike)."""

from __future__ import annotations

import torch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row.

    attention_mask: (B, T) with 1 on real tokens -> (B,) int64. Works for left and right padding because it
    looks for the last 1, not for the first pad. A row with no real token maps to 0.
    """
    mask = attention_mask.bool()
    T = mask.shape[-1]
    # argmax over the reversed mask finds the first 1 from the right.
    from_right = torch.flip(mask, dims=[-1]).to(torch.int64).argmax(dim=-1)
    return torch.where(mask.any(dim=-1), T - 1 - from_right, torch.zeros_like(from_right))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: (B, T) -> (B, T), 0 at each row's first real token,
    so a left-padded row gets the same positions as the unpadded sequence would."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
