"""A gold scorer for tests: longer responses are better (distinct lengths make few ties)."""


def score(prompts, responses):
    return [float(len(r)) for r in responses]
