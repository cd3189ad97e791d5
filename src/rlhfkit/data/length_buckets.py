"""Forward passes over rows of similar length: a padded batch cut into length buckets, each without its pads.

A batch is padded to its longest row, and a transformer's cost grows with the padded width: on the demo's
preference pairs (prompt + a response of 1 to 32 tokens) a batch of 32 rows is 41% padding, and an SFT batch of
8 chatterbot replies about half. Sorting the rows by length and running each bucket of similar rows cropped to
its own longest costs a forward per bucket; the buckets are chosen to minimise (rows x width) summed over buckets
plus a fixed cost per forward. That saving is exact in value: a row's outputs do not depend on the pad columns
(attention masks them out and position ids count real tokens only), only the matmuls' summation order changes
(float rounding).

TRL's `padding_free` and `group_by_length` answer the same waste by packing or by reordering the data; buckets
within a batch keep every batch (and so every step and every resume) as it was.
"""

from __future__ import annotations

from typing import Callable

import torch

# The fixed cost of one more forward, in tokens of work: the per-layer Python and kernel launches of a transformers
# model, and small matmuls' lower throughput. bench/length_buckets.py fits it on the embedded model: about 100 ms a
# forward + 1.9 ms a token in fp32 on 2 AVX2 cores, i.e. 51 tokens. A GPU computes a token in microseconds, so a
# call's overhead is worth many more tokens there (2048 is an estimate: no GPU measured it yet).
OVERHEAD_TOKENS = {"cpu": 48, "cuda": 2048, "mps": 2048}


def overhead_tokens(device: torch.device | str) -> int:
    return OVERHEAD_TOKENS.get(torch.device(device).type, 2048)


def plan_buckets(spans: list[int], overhead: int) -> list[list[int]]:
    """Row indices grouped into buckets of similar span (a row's width from its first to its last real token).

    Minimises sum over buckets of (rows x the bucket's longest span) + `overhead` per bucket, by dynamic
    programming over the rows sorted by span (an optimal bucket is a run of that order). Rows of equal span keep
    their order; the buckets come out shortest first."""
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    # Cuts only between different spans: rows of one span all go where the first of them goes, never dearer.
    starts = [k for k in range(len(order)) if k == 0 or spans[order[k]] != spans[order[k - 1]]] + [len(order)]
    g = len(starts) - 1
    best = [0.0] + [float("inf")] * g  # best[j]: the cheapest cost of the rows of the first j spans
    cut = [0] * (g + 1)
    for j in range(1, g + 1):
        widest = spans[order[starts[j] - 1]]
        for i in range(j):  # last bucket: the rows of spans i..j-1, padded to the widest
            cost = best[i] + (starts[j] - starts[i]) * widest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], g
    while j > 0:
        buckets.append(order[starts[cut[j]]:starts[j]])
        j = cut[j]
    return buckets[::-1]


def real_spans(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first real column and one past its last: (B,), (B,) long. An empty row gets (T, T)."""
    B, T = attention_mask.shape
    real = attention_mask.bool()
    cols = torch.arange(T, device=attention_mask.device).expand(B, T)
    first = torch.where(real, cols, T).min(dim=1).values  # (B,)
    end = torch.where(real, cols + 1, 0).max(dim=1).values  # (B,)
    return first, torch.maximum(end, first)


def row_buckets(attention_mask: torch.Tensor,
                overhead: int | None) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """`plan_buckets` over the rows' real spans (one bucket of all rows when `overhead` is None), and the spans'
    first and end columns (`real_spans`)."""
    first, end = real_spans(attention_mask)
    B = attention_mask.shape[0]
    buckets = [list(range(B))] if overhead is None or B < 2 else plan_buckets((end - first).tolist(), overhead)
    return buckets, first, end


def forward_in_buckets(fn: Callable[[dict], torch.Tensor], batch: dict, overhead: int | None) -> torch.Tensor:
    """`fn(batch)` computed bucket by bucket, each bucket's rows cropped to the columns any of them uses.

    `batch` holds (B, T) tensors (cropped and row-selected; `attention_mask` among them), (B,) tensors
    (row-selected) and anything else (passed as is). `fn` returns (b,) per row, or (b, w - k) per column of its
    (b, w) input (e.g. k = 1 for next-token log-probs); either comes back for the whole batch in the original row
    order, per-column outputs at their full columns (T - k of them) with 0 where a bucket had none.
    `overhead` None: one forward as given (FSDP, whose every forward gathers weights collectively)."""
    mask = batch["attention_mask"]
    B, T = mask.shape
    buckets, first, end = row_buckets(mask, overhead)
    if len(buckets) == 1:
        return fn(batch)
    parts, rows = [], []
    for bucket in buckets:
        index = torch.tensor(bucket, device=mask.device)
        lo = int(first[index].min()) if bool((end[index] > first[index]).any()) else T - 1
        hi = max(int(end[index].max()), lo + 1)
        sub = {key: _select(value, index, lo, hi, B, T) for key, value in batch.items()}
        out = fn(sub)
        if out.dim() == 2:  # per column: back to full width, its first column at `lo`
            k = (hi - lo) - out.shape[1]
            out = torch.nn.functional.pad(out, (lo, T - k - lo - out.shape[1]))
        parts.append(out)
        rows.extend(bucket)
    inverse = torch.empty(B, dtype=torch.long, device=mask.device)
    inverse[torch.tensor(rows, device=mask.device)] = torch.arange(B, device=mask.device)
    return torch.cat(parts)[inverse]


def _select(value, index: torch.Tensor, lo: int, hi: int, B: int, T: int):
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != B:
        return value
    if value.dim() >= 2 and value.shape[1] == T:
        return value[index, lo:hi]
    return value[index]


def bucket_overhead(model: torch.nn.Module) -> int | None:
    """The per-forward overhead for `model`'s device; None (no buckets) when its weights are FSDP shards (DTensor):
    each forward gathers them collectively, so every process must run the same number of forwards."""
    from torch.distributed.tensor import DTensor

    param = next(model.parameters(), None)
    if param is None or isinstance(param, DTensor):
        return None
    return overhead_tokens(param.device)
