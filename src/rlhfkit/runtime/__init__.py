"""What every stage runs on: the choice of precision (and, as they come, devices and process groups).

Imports nothing of rlhfkit's above `core`, so that data, models, rollout, trainers, eval and the CLI can all use it.
"""
