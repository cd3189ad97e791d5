"""Rewards computed by Python functions named as `module:function` (verifiable rewards, rule checks, judges).

The convention is TRL's `reward_funcs`: `fn(prompts, completions, **kwargs) -> list[float]`, one float per
completion. `prompts` are the records' prompts as given (text, or a list of chat messages); `completions`
are the decoded responses as text, or, for a conversational prompt, `[{"role": "assistant", "content":
text}]` as TRL passes them. Extra keyword arguments: `completion_ids` (the response token ids) and every
other field of the prompt records (e.g. `answer` for a maths checker), one entry per completion.

How a function is called depends on its signature: one that names a `completions` parameter or takes
`**kwargs` is called with keywords (only those it accepts, unless it takes `**kwargs`); any other is called
positionally as `fn(prompts, completions)`, like a gold scorer `(prompts, responses)`.

Every mistake (a bad spec, an import that fails, an exception inside the function, a wrong number of
rewards, a value that is not a finite number) is a `UserError` of one line naming the function.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from typing import Callable

from rlhfkit.errors import UserError


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def import_function(spec: str, what: str = "reward function") -> Callable:
    """The callable named by 'package.module:function'. The current directory is tried last, so that a
    `rewards.py` beside the user's data is found also by the `rlhfkit` console script."""
    module_name, _, func_name = str(spec).partition(":")
    if not module_name or not func_name or ":" in func_name:
        raise UserError(f"{what} '{spec}': expected 'module:function' (e.g. 'my_rewards:is_correct')")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            cwd = os.getcwd()
            if exc.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
                raise
            sys.path.append(cwd)
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what} '{spec}': cannot import module '{module_name}': {_one_line(exc)}") from None
    except Exception as exc:  # an error while running the module's own code
        raise UserError(f"{what} '{spec}': importing module '{module_name}' failed: {type(exc).__name__}: "
                        f"{_one_line(exc)}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{what} '{spec}': module '{module_name}' has no function '{func_name}'")
    return func


def _keyword_names(func) -> set[str] | None:
    """The keywords `func` is called with: None for a positional call, {"*"} for all (it takes **kwargs)."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"*"}
    if "completions" in params:
        return set(params)
    return None


class RewardFunction:
    """A `module:function` reward, checked on every call."""

    def __init__(self, spec: str):
        self.spec = spec
        self.func = import_function(spec, "reward function")
        self.name = spec.partition(":")[2]
        self.keywords = _keyword_names(self.func)

    def __call__(self, prompts: list, completions: list, **extra) -> list[float]:
        n = len(completions)
        try:
            if self.keywords is None:
                out = self.func(prompts, completions)
            else:
                given = {"prompts": prompts, "completions": completions, **extra}
                out = self.func(**{k: v for k, v in given.items() if "*" in self.keywords or k in self.keywords})
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"reward function '{self.spec}' raised {type(exc).__name__}: {_one_line(exc)}") from exc
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise UserError(f"reward function '{self.spec}' must return a list of numbers, one per completion; "
                            f"got {type(out).__name__}") from None
        if len(values) != n:
            raise UserError(f"reward function '{self.spec}' returned {len(values)} rewards for {n} completions "
                            f"(it must return one per completion)")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise UserError(f"reward function '{self.spec}' returned a non-finite reward ({values[bad[0]]}) for "
                            f"completion {bad[0]} ({len(bad)} of {n} not finite)")
        return values


def parse_reward_functions(specs: str | None) -> list[RewardFunction]:
    """'a:f' or several separated by commas ('a:f,b:g'); each is imported now, so a bad one fails early."""
    if not specs:
        return []
    return [RewardFunction(spec.strip()) for spec in str(specs).split(",") if spec.strip()]


def parse_weights(text: str | None, n: int, names: list[str]) -> list[float]:
    """Comma-separated weights, one per reward source; None: all 1."""
    if text is None or str(text).strip() == "":
        return [1.0] * n
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise UserError(f"reward_weights '{text}': expected comma-separated numbers") from None
    if len(weights) != n:
        raise UserError(f"reward_weights '{text}': {len(weights)} weights for {n} reward sources "
                        f"({', '.join(names)})")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"reward_weights '{text}': weights must be finite")
    return weights
