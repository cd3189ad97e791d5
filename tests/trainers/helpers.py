"""Small helpers for trainer tests: write JSONL data, build a tiny-preset config with overrides."""

import json
import random

from rlhfkit.config_parsing import build_config

WORDS = ("the cat dog sun tree house river blue green small big fast slow happy quiet loud red old new "
         "warm cold bright dark soft hard long short").split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(stage, **overrides):
    """The tiny preset with `overrides`. In fp32 unless a test asks for another precision: the tiny preset's
    'auto' would run bf16 on a CPU with native bf16 and fp32 on one without, and a test's numbers (tolerances,
    learning margins) must mean the same on both."""
    overrides = {"mixed_precision": "no", **overrides}
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


def save_random_reward_model(folder, seed=1):
    """A tiny reward-model folder (tiny trunk, the real tokenizer) with a random N(0, 1) head: PPO, GRPO and
    RLOO tests train policies to please it."""
    import torch

    from rlhfkit.models.loading import load_tokenizer, resolve_model_path
    from rlhfkit.models.reward_model import load_reward_model

    tokenizer = load_tokenizer(None)
    rm = load_reward_model(resolve_model_path("tiny"), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.manual_seed(seed)
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
