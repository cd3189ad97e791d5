"""Loading causal LMs and tokenizers, the embedded default, tiny test models, reward/value heads."""
