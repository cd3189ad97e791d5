"""Small helpers for trainer tests: write JSONL data, build a tiny-preset config with overrides."""

import json
import random

from rlhfkit.config import build_config

WORDS = ("the cat dog sun tree house river blue green small big fast slow happy quiet loud red old new "
         "warm cold bright dark soft hard long short").split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(stage, **overrides):
    return build_config(stage, preset="tiny", overrides=[(k, str(v)) for k, v in overrides.items()])


def keyword_pairs(n, seed):
    """Preference pairs whose rule is learnable: the chosen response carries 'excellent' where the
    rejected one carries 'terrible'; everything else is the same random words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        at = rng.randint(0, len(words))
        chosen = words[:at] + ["excellent"] + words[at:]
        rejected = words[:at] + ["terrible"] + words[at:]
        rows.append({"prompt": f"Describe the {rng.choice(WORDS)}.", "chosen": " ".join(chosen),
                     "rejected": " ".join(rejected)})
    return rows
