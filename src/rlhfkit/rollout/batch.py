"""A batch of (prompt, response) sequences laid out for scoring and PPO updates.

Layout: each row is the prompt LEFT-padded to width P, then the response RIGHT-padded to width R:

    [pad pad p1 p2 p3 | r1 r2 EOS pad pad]
     <----- P ------>   <------ R ------>

so every response starts at column P. The logits at columns P-1 .. P+R-2 predict the response tokens,
and per-token tensors (log-probs, values, rewards, advantages) are (B, R), aligned with `response_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.core.positions import position_ids_from_mask
from rlhfkit.data.length_buckets import row_buckets


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor       # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long, 1 on real prompt and response tokens
    position_ids: torch.Tensor    # (B, P + R) long, counted over real tokens
    response_mask: torch.Tensor   # (B, R) float, 1 on response tokens (EOS included)
    ended: torch.Tensor           # (B,) bool, the response finished with EOS
    prompt_width: int             # P

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) response token ids (pads after the end)."""
        return self.input_ids[:, self.prompt_width:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def select(self, rows: torch.Tensor | list[int]) -> "RolloutBatch":
        """The sub-batch of the given rows, without the columns that are padding in all of them.

        Leading prompt columns and trailing response columns that no selected row uses are cut, so a
        sub-batch of short sequences costs what short sequences cost. Responses still start at column
        P' = the sub-batch's own prompt width, and its R' <= R response columns are the first R' of the
        full batch's: per-token tensors of the full batch are aligned by slicing them `[rows, :R']`.
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        mask = self.attention_mask[index]
        P = self.prompt_width
        used = mask.any(dim=0)  # (P + R,) columns some selected row uses
        first = int(used[:P].long().argmax()) if used[:P].any() else P - 1
        response_used = used[P:].nonzero()
        width = int(response_used[-1]) + 1 if len(response_used) else 1
        cols = slice(first, P + width)
        return RolloutBatch(self.input_ids[index][:, cols], mask[:, cols], self.position_ids[index][:, cols],
                            self.response_mask[index][:, :width], self.ended[index], P - first)

    def micro_batches(self, rows: torch.Tensor, size: int):
        """Split `rows` into micro-batches of `size`, grouping rows of similar length so that trimming in
        `select` removes most padding. Yields (row indices, trimmed sub-batch)."""
        rows = rows.to(self.device)  # the yielded indices address this batch's (and its Experience's) tensors
        lengths = self.attention_mask[rows].sum(dim=1)
        rows = rows[torch.argsort(lengths, stable=True)]
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            yield chunk, self.select(chunk)

    def length_buckets(self, overhead: int | None):
        """All rows in buckets of similar length (data/length_buckets.row_buckets with a forward's `overhead`;
        None: one bucket), each trimmed by `select`. Yields (row indices, trimmed sub-batch)."""
        for bucket in row_buckets(self.attention_mask, overhead)[0]:
            rows = torch.tensor(bucket, dtype=torch.long, device=self.device)
            yield rows, self.select(rows)


def build_rollout_batch(prompts: list[list[int]], responses: list[list[int]], ended: list[bool],
                        pad_id: int, device: torch.device | str = "cpu") -> RolloutBatch:
    """Lay out B prompts (left-padded) and their responses (right-padded) as one batch, on `device`."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, P - len(prompt):P] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, P - len(prompt):P] = 1
        if response:
            input_ids[row, P:P + len(response)] = torch.tensor(response, dtype=torch.long)
            attention_mask[row, P:P + len(response)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask),
                        response_mask=attention_mask[:, P:].float(),
                        ended=torch.tensor(ended, dtype=torch.bool, device=device), prompt_width=P)
