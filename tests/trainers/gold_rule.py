"""A gold scorer for tests: +1 for 'excellent', -1 for 'terrible'."""


def score(prompts, responses):
    return [float("excellent" in r) - float("terrible" in r) for r in responses]
