"""rlhfkit: the whole RLHF recipe on Hugging Face causal language models."""

__version__ = "0.1.0"
