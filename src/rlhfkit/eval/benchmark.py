"""A capability benchmark before and after: EleutherAI's lm-evaluation-harness on the reference and the policy.

The gold score says what RLHF gained; a benchmark says what it cost (the alignment tax). `--benchmark
lm-eval:TASK[,TASK]` runs lm-eval (a dependency of rlhfkit) on both models, in this process, on the models eval
already loaded. Tasks are lm-eval's own (hellaswag, arc_easy, ...: their data sets must be
downloadable or cached) or the local ones this package ships in `lm_eval_tasks/`, defined in lm-eval's task
YAML, which need nothing from the network:
- rlhfkit_reply_choice: for a held-out chatterbot question, which of four replies is its own (acc, acc_norm).

Per task and metric, eval.json gets both models' values with lm-eval's standard errors, and the change
policy - reference with the standard error sqrt(se_p^2 + se_r^2). The two models answer the same documents,
so their errors are positively correlated and that interval is conservative.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models.loading import first_line

LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"
HARNESSES = ("lm-eval",)
# lm-eval's default (100,000) is minutes per task; a mean's standard error is closed-form whatever this is, and
# the bootstrapped ones (perplexity, F1, ...) are stable to about 3% at 1,000 draws.
BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class Benchmark:
    harness: str
    tasks: tuple[str, ...]


def parse_benchmark(spec: str) -> Benchmark:
    """'lm-eval:TASK[,TASK]' -> Benchmark; ConfigError naming the key otherwise."""
    harness, sep, tasks = spec.partition(":")
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not sep or harness not in HARNESSES or not names:
        raise ConfigError(f"key 'benchmark': expected lm-eval:TASK[,TASK] (for example lm-eval:rlhfkit_reply_choice "
                          f"or lm-eval:hellaswag,arc_easy), got {spec!r}")
    return Benchmark(harness, names)


def local_task_names() -> list[str]:
    return sorted(p.stem for p in LOCAL_TASKS.glob("*.yaml"))


@functools.lru_cache(maxsize=2)
def _task_manager(local_only: bool):
    """lm-eval's index of tasks: ours alone (instant), or with its own, which reads every task YAML (about
    10 s on a 2-core CPU), so built once and only when a task is not ours."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=not local_only)


def _is_local(bench: Benchmark) -> bool:
    return set(bench.tasks) <= set(local_task_names())


def check_benchmark(spec: str) -> Benchmark:
    """Parse `spec` and check that lm-eval is installed: cheap, for config validation."""
    bench = parse_benchmark(spec)
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("key 'benchmark': lm-eval is not installed (a dependency of rlhfkit); pip install lm-eval")
    return bench


def check_tasks(bench: Benchmark) -> None:
    """Every task is one lm-eval knows: before any model is loaded. Local names need no index."""
    if _is_local(bench):
        return
    known = set(_task_manager(False).all_tasks)
    unknown = [t for t in bench.tasks if t not in known]
    if unknown:
        raise ConfigError(f"key 'benchmark': lm-eval has no task {unknown[0]!r} (local tasks: "
                          f"{', '.join(local_task_names())}; `lm-eval ls tasks` lists the others)")


def run_benchmark(bench: Benchmark, model, tokenizer, batch_size: int, limit: int = 0, seed: int = 0) -> dict:
    """Score one loaded model: {task: {"n": documents, "version": .., "metrics": {name: {"value", "stderr",
    "higher_is_better"}}}}. `limit` > 0: the first `limit` documents of each task (lm-eval's --limit)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    # lm-eval warns that a loaded model ignores its device and dtype arguments, and that a custom data set takes
    # --metadata: both about its own CLI, not this call; errors still show.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=_context(model))
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(bench.tasks), task_manager=_task_manager(_is_local(bench)), limit=limit or None,
            bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as exc:  # a task's data set that cannot be fetched offline, a broken task YAML, ...
        raise UserError(f"benchmark {','.join(bench.tasks)}: lm-eval failed: {first_line(exc)}") from exc
    finally:
        model.train(was_training)
    scores = {}
    for task in bench.tasks:
        row = results["results"][task]
        metrics = {}
        for key, value in row.items():
            name, sep, filt = key.partition(",")
            if not sep or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{name}_stderr,{filt}")
            # A metric under a filter other than lm-eval's default keeps it in its name (gsm8k: strict-match
            # and flexible-extract), so that neither overwrites the other.
            metrics[name if filt == "none" else f"{name},{filt}"] = {"value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                             "higher_is_better": results["higher_is_better"].get(task, {}).get(name)}
        scores[task] = {"n": _documents(results, task), "version": results["versions"].get(task),
                        "metrics": metrics}
    return scores


def _documents(results: dict, task: str) -> int:
    """Documents a task was scored on; a group (mmlu) counts those of its subtasks, at any depth."""
    if task in results.get("n-samples", {}):
        return int(results["n-samples"][task]["effective"])
    return sum(_documents(results, sub) for sub in results.get("group_subtasks", {}).get(task, []))


def compare(policy: dict, reference: dict, same_model: bool = False) -> dict:
    """Both models' scores side by side, per task and metric, with the change and its (conservative) error;
    `same_model`: the policy is the reference itself, so the change is exactly 0."""
    tasks = {}
    for task, ours in policy.items():
        theirs = reference[task]
        rows = {}
        for name, p in ours["metrics"].items():
            r = theirs["metrics"][name]
            errors = [e for e in (p["stderr"], r["stderr"]) if e is not None]
            rows[name] = {"policy": p["value"], "policy_stderr": p["stderr"], "reference": r["value"],
                          "reference_stderr": r["stderr"], "delta": p["value"] - r["value"],
                          "delta_stderr": 0.0 if same_model else math.hypot(*errors) if len(errors) == 2 else None,
                          "higher_is_better": p["higher_is_better"]}
        tasks[task] = {"n": ours["n"], "version": ours["version"], "metrics": rows}
    return tasks


def _context(model) -> int:
    """The model's context length, so lm-eval truncates to what the model can take."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
