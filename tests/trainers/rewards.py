"""Reward functions for the GRPO/RLOO tests, named as `tests.trainers.rewards:NAME` (TRL's convention)."""

import functools


def vowel_share(completions, **kwargs):
    """A verifiable reward the tiny random model can learn: the share of letters in the completion that
    are vowels (its random samples start near 0.3)."""
    out = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out


def short(prompts, completions, completion_ids, **kwargs):
    """Minus the number of completion tokens (checks that completion_ids arrive)."""
    return [-float(len(ids)) for ids in completion_ids]


def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def not_finite(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def positional(prompts, responses):
    """A gold-scorer-style function (prompts, responses), called positionally."""
    return [float(len(r) > 0) for r in responses]


@functools.lru_cache(maxsize=1)
def _aligned_token_ids() -> frozenset:
    from safetensors.torch import load_file

    from rlhfkit.models.loading import resolve_model_path

    weights = load_file(resolve_model_path("tiny") / "model.safetensors")
    embeddings = weights["model.embed_tokens.weight"]
    return frozenset((embeddings[:, 0] > 0).nonzero().flatten().tolist())


def aligned_tokens(prompts, completions, completion_ids, **kwargs):
    """A verifiable rule on token ids that the tiny random model can learn in a few steps: the share of
    completion tokens whose (tiny model's) embedding has a positive first coordinate. Its random samples are
    near 0.5; the rule is one direction in the model's hidden space, so the policy can move towards it (a
    text rule such as "contains a keyword" is almost never met by a random 49k-token model: no signal)."""
    aligned = _aligned_token_ids()
    return [sum(t in aligned for t in ids) / len(ids) if ids else 0.0 for ids in completion_ids]
