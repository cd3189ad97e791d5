"""The documents of lm-eval task `rlhfkit_reply_choice`: pick a question's reply among four.

Built from a packaged source, the embedded chatterbot corpus (chatterbot-corpus on PyPI), and only from its
held-out split, which no stage trains on: for each held-out (question, reply) pair, that reply and three
replies to other held-out questions, in an order drawn from a fixed seed. A model that follows a conversation
scores well above chance (0.25); RLHF that trades coherence for the reward shows up here as a lower accuracy.
lm-eval loads this file through the task's YAML (`custom_dataset: !function reply_choice_docs.load`).
"""

from __future__ import annotations

import random

N_CHOICES = 4
SEED = 20241130


def build_docs(records: list[dict], seed: int = SEED) -> list[dict]:
    """{"question", "choices", "label"} per record of `records` ({"prompt", "completion"} each), in their
    order. Distractors are replies to other prompts that differ from every reply to this one."""
    replies: dict[str, list[str]] = {}
    for record in records:
        replies.setdefault(record["prompt"], []).append(record["completion"])
    pool = sorted({c for cs in replies.values() for c in cs})
    rng = random.Random(seed)
    docs = []
    for record in records:
        own = replies[record["prompt"]]
        others = [c for c in pool if c not in own]
        if len(others) < N_CHOICES - 1:
            raise ValueError(f"only {len(others)} replies to other questions; need {N_CHOICES - 1}")
        choices = rng.sample(others, N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, record["completion"])
        docs.append({"question": record["prompt"], "choices": choices, "label": label})
    return docs


def load(**_kwargs):
    """lm-eval's `custom_dataset` hook: a DatasetDict with one split, "test"."""
    import datasets

    from rlhfkit.data.stage_records import embedded_sft_split

    _, held_out = embedded_sft_split()
    docs = build_docs(held_out)
    # The held-out records come in the corpus's order, topic by topic; shuffled (with the fixed seed), the first
    # N documents, all that lm-eval's `limit` (`benchmark_limit`) reads, are a sample of every topic.
    random.Random(SEED).shuffle(docs)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
