"""The MLRun workflow of the recipe: SFT -> annotate -> reward -> PPO -> eval (of SFT and of PPO).

Register it in a project and run it (`project.py` does both):
    project.set_workflow("rlhf", "<this file>")
    project.run("rlhf", engine="local", local=True, arguments={"preset": "tiny"})
Each step is one run of the `rlhfkit` function (function.yaml), chained by the folders the previous steps
logged (`model_dir`, `preferences_path`). A step that fails stops the workflow: MLRun's local runner does not
raise a handler's exception, and would otherwise wait for the failed step forever.
"""

from __future__ import annotations

import mlrun


def pipeline(model: str = "embedded", preset: str = None, sft_settings: dict = None, annotate_settings: dict = None,
             reward_settings: dict = None, ppo_settings: dict = None, eval_settings: dict = None):
    """Run the recipe; every `*_settings` is that stage's settings (keys as in its YAML section)."""
    project = mlrun.get_current_project()

    def step(handler: str, name: str, settings: dict, inputs: dict = None, **params):
        run = project.run_function("rlhfkit", handler=handler, name=f"rlhfkit-{name}", local=True,
                                   params={**params, "settings": settings or {}, "preset": preset},
                                   inputs=inputs or {})
        if run.state() != "completed":
            run.status.state = "error"  # so that the workflow ends Failed instead of waiting for it
            # Without a server MLRun keeps no error text on the run: its "Exec error" log line above has it.
            raise RuntimeError(f"rlhfkit workflow: step {name} failed (state {run.state()!r}; its error is logged "
                               f"above as 'Exec error')")
        return run.status.results

    policy0 = step("sft", "sft", sft_settings, model=model)["model_dir"]
    pairs = step("annotate", "annotate", annotate_settings, model=policy0)["preferences_path"]
    reward_model = step("reward", "reward", reward_settings, inputs={"preferences": pairs}, model=policy0)["model_dir"]
    policy = step("ppo", "ppo", ppo_settings, model=policy0, reward_model=reward_model)["model_dir"]
    for name, evaluated in (("sft", policy0), ("ppo", policy)):
        step("evaluate", f"eval-{name}", eval_settings, model=evaluated, ref_model=policy0, reward_model=reward_model)
