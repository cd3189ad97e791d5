"""rlhfkit's stages as MLRun functions: one handler per stage (handlers.py), the function spec a hub lists
(function.yaml, item.yaml, written by export.py) and the SFT -> annotate -> reward -> PPO -> eval workflow
(workflow.py). MLRun is imported only here, and only under MLRun (`pip install mlrun`, its own virtualenv:
its pins on numpy, pandas and pyarrow are older than the main environment's)."""
