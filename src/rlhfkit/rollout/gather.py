"""One iteration's experience from several processes, joined into the global batch every process then holds.

Under a launcher each process samples and scores its share of the iteration's prompts (the expensive part).
The shares are then gathered, so that every process holds the whole batch in its global order, padded as one
process would pad it. Everything computed on the batch afterwards (the KL-shaped rewards and GAE, advantage
whitening over all tokens, GRPO/RLOO group baselines, the KL controller's mean KL, explained variance, the
mini-batch order and its loss normalisers) is then the one-process value by construction, computed alike by
every process, with no statistic left to reduce by hand (verl computes advantages on the gathered batch too).

The experience is small next to the models (a few floats per token), so gathering it costs little.
"""

from __future__ import annotations

import torch

from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.experience import Experience
from rlhfkit.runtime.distributed import Processes, all_gather

# The Experience fields gathered per token (B, R) and per sample (B,); reward_parts is (S, B). Advantages
# and returns are computed after gathering.
PER_TOKEN = ("logprobs", "ref_logprobs", "values", "loss_mask")
PER_SAMPLE = ("scores",)


def experience_rows(exp: Experience) -> list[dict]:
    """Each sample of `exp` on its own, unpadded and on the CPU (what a process sends to the others)."""
    batch = exp.batch
    P = batch.prompt_width
    rows = []
    for i in range(len(exp)):
        prompt_len = int(batch.attention_mask[i, :P].sum())
        n = int(batch.response_mask[i].sum())
        row = {"prompt_ids": batch.input_ids[i, P - prompt_len:P].tolist(),
               "response_ids": batch.input_ids[i, P:P + n].tolist(), "ended": bool(batch.ended[i]),
               "record": exp.records[i], "text": exp.texts[i]}
        for name in PER_TOKEN:
            tensor = getattr(exp, name)
            row[name] = None if tensor is None else tensor[i, :n].cpu()
        for name in PER_SAMPLE:
            row[name] = getattr(exp, name)[i].cpu()
        row["reward_parts"] = None if exp.reward_parts is None else exp.reward_parts[:, i].cpu()
        rows.append(row)
    return rows


def join_rows(rows: list[dict], pad_id: int, device: torch.device | str) -> Experience:
    """The Experience of `rows` in their order, laid out as if sampled as one batch."""
    batch = build_rollout_batch([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                                [r["ended"] for r in rows], pad_id, device)
    B, R = batch.response_mask.shape
    fields = {}
    for name in PER_TOKEN:
        if rows[0][name] is None:
            fields[name] = None
            continue
        tensor = torch.zeros(B, R, dtype=rows[0][name].dtype)
        for i, row in enumerate(rows):
            tensor[i, :len(row[name])] = row[name]
        fields[name] = tensor.to(device)
    for name in PER_SAMPLE:
        fields[name] = torch.stack([r[name] for r in rows]).to(device)
    parts = None if rows[0]["reward_parts"] is None else torch.stack([r["reward_parts"] for r in rows], 1).to(device)
    return Experience(batch, [r["record"] for r in rows], [r["text"] for r in rows], reward_parts=parts, **fields)


def gather_experience(local: Experience | None, indices: list[int], procs: Processes, pad_id: int,
                      device: torch.device | str) -> Experience:
    """The global batch from every process's `local` experience, whose samples have these global `indices`
    (None with no indices: a process with no share this iteration). One process: `local` as it is.

    Timings are the slowest process's: the iteration waits for it."""
    if not procs.many:
        return local
    mine = list(zip(indices, experience_rows(local))) if local is not None else []
    timings = local.timings if local is not None else {}
    gathered = all_gather((timings, mine), procs)
    rows = sorted((pair for _, part in gathered for pair in part), key=lambda pair: pair[0])
    assert [i for i, _ in rows] == list(range(len(rows))), "every global sample exactly once"
    exp = join_rows([row for _, row in rows], pad_id, device)
    for part_timings, _ in gathered:
        for key, value in part_timings.items():
            exp.timings[key] = max(exp.timings.get(key, 0.0), value)
    return exp
