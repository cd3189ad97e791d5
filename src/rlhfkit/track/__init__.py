"""Experiment trackers (tensorboard, mlflow, wandb, trackio) behind one small interface (`base.Tracker`).

`report_to: [tensorboard, mlflow]` (any subset; default none) makes every stage send what it writes to
metrics.jsonl, its resolved config, its results (eval.json, annotate's summary) and its final files to each tracker,
through the tracker's own library, imported only when asked for (each is an optional extra:
`pip install "rlhfkit[mlflow]"`). `stage.tracked` wraps a stage's entry point; `stage.pipeline_tracking` makes the
stages of a pipeline one group.
"""
