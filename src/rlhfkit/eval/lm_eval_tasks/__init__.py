"""lm-eval task definitions that rlhfkit ships (YAML, with the Python that builds their documents)."""
