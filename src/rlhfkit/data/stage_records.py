"""Train and held-out records for a stage: the user's files, or the embedded chatterbot corpus."""

from __future__ import annotations

from rlhfkit.data.loading import load_chatterbot_sft, load_records
from rlhfkit.data.split import split_records

# The embedded corpus is split once, with a seed of its own, so that every stage (SFT, annotation, RL,
# evaluation) agrees on which prompts are held out, whatever seed a run uses.
EMBEDDED_SPLIT_SEED = 20240521
# A fifth of the prompts (150 of 748): an evaluation's 95% intervals are over its prompts, and between-prompt
# differences dominate the gold score's variance, so at a tenth (75 prompts) a real gain of 0.1 in the demo's
# gold score could not show with its interval apart from SFT's. The 598 left are more than any stage draws.
EMBEDDED_EVAL_FRACTION = 0.2


def embedded_sft_split() -> tuple[list[dict], list[dict]]:
    return split_records(load_chatterbot_sft(), EMBEDDED_EVAL_FRACTION, EMBEDDED_SPLIT_SEED,
                         key=lambda record: record["prompt"])


def embedded_prompts(split: str) -> list[dict]:
    """Distinct prompts of the embedded corpus, from the 'train' or 'eval' split, as prompt records."""
    train, held = embedded_sft_split()
    seen, prompts = set(), []
    for record in train if split == "train" else held:
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            prompts.append({"prompt": record["prompt"]})
    return prompts


def prompt_records(data: str | None, split: str, limit: int = 0, keep_extra: bool = False) -> list[dict]:
    """Prompt records from the user's file (with its other fields if `keep_extra`), else the embedded corpus's
    `split`; at most `limit` (0: all)."""
    records = load_records(data, "prompt", keep_extra=keep_extra) if data else embedded_prompts(split)
    return records[:limit] if limit > 0 else records


def train_eval_records(config, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of `kind` for a training stage, validated; `max_samples` caps train."""
    if config.data is None:
        if kind != "sft":
            from rlhfkit.errors import UserError

            raise UserError(f"--data is required: a {kind} file (JSONL, Parquet or a datasets folder)")
        train, held = embedded_sft_split()
        if config.eval_data is None:
            evals = held
        else:
            evals = load_records(config.eval_data, kind)
    else:
        records = load_records(config.data, kind)
        if config.eval_data is not None:
            train, evals = records, load_records(config.eval_data, kind)
        else:
            # Records sharing a prompt stay together, so held-out prompts are really unseen.
            train, evals = split_records(records, config.eval_fraction, config.seed,
                                         key=lambda record: record.get("prompt", record.get("messages")))
    if config.max_samples > 0:
        train = train[:config.max_samples]
    return train, evals
