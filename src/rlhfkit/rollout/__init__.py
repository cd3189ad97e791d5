"""Generation from left-padded prompts and scoring of the responses."""
