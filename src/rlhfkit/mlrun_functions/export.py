"""Write function.yaml (the `rlhfkit` MLRun function, handlers.py's code embedded, every handler's typed
parameters read from its signature and docstring) as a hub lists it: `python -m rlhfkit.mlrun_functions.export`.
Run it again after changing handlers.py; a test checks that function.yaml holds handlers.py as it is."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
# The packages a job's image needs beyond MLRun's; rlhfkit pulls in torch, transformers, peft, lm-eval.
REQUIREMENTS = ["rlhfkit"]


def build_function():
    import mlrun

    fn = mlrun.code_to_function(name="rlhfkit", filename=str(HERE / "handlers.py"), kind="job", image="mlrun/mlrun",
                                handler="sft", with_doc=True, requirements=REQUIREMENTS,
                                description="rlhfkit's RLHF stages (SFT, annotate, reward, PPO, GRPO, DPO, eval) "
                                            "on Hugging Face causal LMs", categories=["machine-learning",
                                                                                    "model-training",
                                                                                    "huggingface"],
                                labels={"author": "rlhfkit"})
    # Where it was exported from is this machine's business, not the hub's.
    fn.spec.build.code_origin = ""
    fn.spec.build.origin_filename = ""
    fn.spec.filename = "handlers.py"
    return fn


def main() -> None:
    build_function().export(str(HERE / "function.yaml"))
    print(f"wrote {HERE / 'function.yaml'}")


if __name__ == "__main__":
    main()
