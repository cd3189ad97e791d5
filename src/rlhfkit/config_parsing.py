"""Filling the stage configs (config.py) from presets, YAML files and `--key value` flags, and checking them.

Precedence (later wins): dataclass defaults < `--preset NAME` < `--config FILE.yaml` < `--key value` flags.
Flags are parsed by transformers' `HfArgumentParser` over the same dataclasses (their `help` and `choices`
metadata), YAML by PyYAML's safe loader; every value, from a flag, a file or a pipeline, goes through one
coercion (`coerce`), so `null`, `yes`/`no` and numbers mean the same everywhere. An unknown key or a bad value
is a `ConfigError` naming the file, line and key (or the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.config import (STAGES, AnnotateConfig, GRPOConfig, LoggingConfig, OptimizerConfig, PPOConfig,
                            SamplingConfig, TrainConfig)
from rlhfkit.errors import ConfigError
from rlhfkit.runtime.device import parse_device


def field_specs(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _base_type(tp):
    """(python type, optional?) for a field annotation such as `int`, `str | None`, `float`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(cls, key: str, value: Any, where: str) -> Any:
    """Check (and for strings from the command line, convert) one value for field `key` of `cls`."""
    specs = field_specs(cls)
    if key not in specs:
        close = [k for k in specs if k.split("_")[0] == key.split("_")[0]]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    hints = typing.get_type_hints(cls)
    tp, optional = _base_type(hints[key])
    if typing.get_origin(tp) is list:
        return _coerce_list(specs[key], key, value, where)
    from_text = isinstance(value, str) and tp is not str
    if value is None or (from_text and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"{where}: key '{key}': must not be null")
    try:
        if tp is bool:
            if isinstance(value, bool):
                out = value
            elif from_text and value.lower() in ("true", "yes", "1", "on"):
                out = True
            elif from_text and value.lower() in ("false", "no", "0", "off"):
                out = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
        else:  # pragma: no cover - every field uses one of the types above
            out = value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: key '{key}': expected {tp.__name__}, got {value!r}") from None
    choices = specs[key].metadata.get("choices")
    if choices is not None and out not in choices:
        raise ConfigError(f"{where}: key '{key}': {out!r} is not one of {', '.join(map(str, choices))}")
    return out


def _coerce_list(spec: dataclasses.Field, key: str, value: Any, where: str) -> list[str]:
    """A list of names (e.g. report_to): a YAML list, or comma-separated text from the command line
    ('tensorboard,mlflow'); 'none' or '' is the empty list. Each item must be one of the field's choices."""
    if value is None:
        return []
    if isinstance(value, str):
        items = [] if value.strip().lower() in ("", "none", "null") else [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ConfigError(f"{where}: key '{key}': expected a list of names (or comma-separated text), got {value!r}")
    choices = spec.metadata.get("choices")
    for item in items:
        if choices is not None and item not in choices:
            raise ConfigError(f"{where}: key '{key}': {item!r} is not one of {', '.join(map(str, choices))}")
    return list(dict.fromkeys(items))  # each once, in the order given


def _yaml_problem(exc: Exception) -> str:
    """The YAML error in words. The safe loader refuses tags such as `!!python/object/apply:os.system` (nothing
    in a config file is ever run); say so plainly instead of PyYAML's 'could not determine a constructor'."""
    problem = str(getattr(exc, "problem", None) or exc).strip()
    if isinstance(exc, yaml.constructor.ConstructorError) and problem.count("'") >= 2:
        tag = problem.split("'")[1].replace("tag:yaml.org,2002:", "!!")
        return f"the tag '{tag}' is not allowed (a config file holds plain values; nothing in it is run)"
    return problem.splitlines()[0] if problem else type(exc).__name__


def _yaml_mapping(path: Path) -> tuple[dict, dict]:
    """Read a YAML mapping; return (values, line of each top-level key) for error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {_yaml_problem(exc)}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict) or node is None or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:1: a config file must be a mapping of key: value")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return values, lines


def preset_path(name: str) -> Path:
    path = Path(__file__).parent / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(known)})")
    return path


def _apply_mapping(cls, values: dict, lines: dict, path: Path, section: str | None, out: dict) -> None:
    for key, value in values.items():
        line = lines.get(key)
        where = f"{path}:{line}" if line else str(path)
        if section:
            where += f" [{section}]"
        out[str(key).replace("-", "_")] = coerce(cls, str(key).replace("-", "_"), value, where)


@dataclasses.dataclass
class ConfigSources:
    config: str | None = dataclasses.field(default=None, metadata={"help": "A YAML file of config fields."})
    preset: str | None = dataclasses.field(default=None, metadata={"help": "A built-in configuration (e.g. tiny)."})


def _flag_parser(*classes, prog: str):
    """HfArgumentParser over `classes`, whose values go through `coerce` and whose mistakes raise ConfigError
    (argparse would print usage and exit). Only the flags given end up in the parsed namespace."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):
            raise ConfigError(message)

    # One line per help text, however long: the help is read in a terminal, grepped and tested as written.
    parser = Parser(classes, prog=prog, allow_abbrev=False, add_help=False,
                    formatter_class=lambda prog: argparse.HelpFormatter(prog, width=10**6, max_help_position=36))
    owners = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    for action in parser._actions:
        cls = owners.get(action.dest)
        if cls is None:
            continue
        flag = "--" + action.dest.replace("_", "-")
        action.type = lambda text, cls=cls, key=action.dest, flag=flag: coerce(cls, key, text, flag)
        action.choices = None  # checked by coerce, with the message every source gets
        if action.nargs == "+":  # a list field: one comma-separated value (--report-to tensorboard,mlflow)
            action.nargs = None
        action.default = argparse.SUPPRESS  # also for HF's --no_FLAG complements, whose dest is the field's
    return parser


def parse_flags(cls, args: list[str], prog: str) -> tuple[ConfigSources, dict[str, Any]]:
    """`--config`, `--preset` and the `--key value` flags of `cls` (also `--key=value`, and a bare `--flag` for
    true): (the sources, {field: value} of the flags given, coerced)."""
    parser = _flag_parser(cls, ConfigSources, prog=prog)
    namespace, unknown = parser.parse_known_args(args)
    if unknown:
        first = unknown[0]
        if first.startswith("--") and len(first) > 2:
            key = first[2:].split("=", 1)[0].replace("-", "_")
            coerce(cls, key, None, f"--{key.replace('_', '-')}")  # raises: unknown key, with a suggestion
        raise ConfigError(f"unexpected argument '{first}' (options look like --key value)")
    given = vars(namespace)
    sources = ConfigSources(given.pop("config", None), given.pop("preset", None))
    return sources, given


def flags_help(cls, prog: str) -> str:
    """Every field of `cls` as argparse lists it (name, type, default, help), for `rlhfkit <stage> --help`."""
    parser = _flag_parser(cls, ConfigSources, prog=prog)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for action in parser._actions:  # show the defaults in the help (they are suppressed for parsing)
        spec = fields.get(action.dest)
        if spec is not None:
            value = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
            choices = spec.metadata.get("choices")
            text = f"{action.help} (default: {value}" + (f"; one of {', '.join(choices)})" if choices else ")")
            action.help = text.replace("%", "%%")  # argparse formats help strings with %
    return parser.format_help()


def build_config(stage: str, config_file: str | None = None, preset: str | None = None, overrides=()):
    """Resolve a stage's config from defaults, a preset, a YAML file and flag overrides (a dict or (key, value)
    pairs; text is converted as on the command line)."""
    cls = STAGES[stage]
    values: dict[str, Any] = {}
    if preset:
        path = preset_path(preset)
        data, _ = _yaml_mapping(path)
        section = data.get(stage) or {}
        _apply_mapping(cls, section, {}, path, stage, values)
    if config_file:
        path = Path(config_file)
        data, lines = _yaml_mapping(path)
        _apply_mapping(cls, data, lines, path, None, values)
    for key, text in (overrides.items() if isinstance(overrides, dict) else overrides):
        values[key] = coerce(cls, key, text, f"--{key.replace('_', '-')}")
    config = cls(**values)
    validate(config)
    return config


def validate(config) -> None:
    """Cross-field checks that types alone cannot express."""
    positive = ("batch_size", "gradient_accumulation_steps", "max_prompt_length", "max_length",
                "responses_per_prompt", "max_new_tokens", "rollout_batch_size", "ppo_epochs", "max_bad_steps",
                "prompts_per_step", "num_iterations", "overlap", "benchmark_batch_size")
    for name in positive:
        if hasattr(config, name) and getattr(config, name) < 1:
            raise ConfigError(f"key '{name}': must be >= 1, got {getattr(config, name)}")
    nonneg = ("max_steps", "eval_every", "save_every", "keep_last_n", "max_samples", "num_prompts",
              "max_grad_norm", "weight_decay", "label_temperature", "eval_batches", "learning_rate",
              "forward_batch_size", "beta", "mini_batch_size", "best_of_n", "benchmark_limit")
    for name in nonneg:
        if hasattr(config, name) and getattr(config, name) < 0:
            raise ConfigError(f"key '{name}': must be >= 0, got {getattr(config, name)}")
    if hasattr(config, "device"):
        parse_device(config.device)
    if isinstance(config, LoggingConfig) and config.log_every < 1:
        raise ConfigError(f"key 'log_every': must be >= 1, got {config.log_every}")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"key 'max_prompt_length': must be < max_length ({config.max_length}), "
                          f"got {config.max_prompt_length}")
    if isinstance(config, TrainConfig) and not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"key 'eval_fraction': must be in [0, 1), got {config.eval_fraction}")
    if isinstance(config, OptimizerConfig) and not 0 <= config.warmup_ratio <= 1:
        raise ConfigError(f"key 'warmup_ratio': must be in [0, 1], got {config.warmup_ratio}")
    if isinstance(config, TrainConfig) and config.num_epochs <= 0 and config.max_steps == 0:
        raise ConfigError("key 'num_epochs': must be > 0 when max_steps is 0")
    if isinstance(config, AnnotateConfig) and config.responses_per_prompt < 2:
        raise ConfigError(f"key 'responses_per_prompt': must be >= 2, got {config.responses_per_prompt}")
    if isinstance(config, PPOConfig) and config.mini_batch_size < 1:
        raise ConfigError(f"key 'mini_batch_size': must be >= 1, got {config.mini_batch_size}")
    if isinstance(config, GRPOConfig):
        _validate_group(config)
    if isinstance(config, PPOConfig):
        if config.rollout_batch_size % config.mini_batch_size:
            raise ConfigError(f"key 'mini_batch_size': must divide rollout_batch_size ({config.rollout_batch_size}), "
                              f"got {config.mini_batch_size}")
        if config.mini_batch_size % config.gradient_accumulation_steps:
            raise ConfigError(f"key 'gradient_accumulation_steps': must divide mini_batch_size "
                              f"({config.mini_batch_size}), got {config.gradient_accumulation_steps}")
        if config.dual_clip is not None and config.dual_clip <= 1:
            raise ConfigError(f"key 'dual_clip': must be > 1, got {config.dual_clip}")
    if isinstance(config, SamplingConfig) and config.temperature <= 0:
        raise ConfigError(f"key 'temperature': must be > 0, got {config.temperature}")
    if getattr(config, "benchmark", None):  # lm-eval missing or a task it lacks: said before any model loads
        from rlhfkit.eval.benchmark import check_benchmark

        check_benchmark(config.benchmark)
    if getattr(config, "report_to", None):  # a tracker asked for but not installed: say so before anything runs
        from rlhfkit.track.registry import check_installed

        check_installed(config.report_to)


def _validate_group(config) -> None:
    """GRPO/RLOO: the rollout splits into whole mini-batches, and those into whole micro-batches."""
    if config.num_generations < 2:
        raise ConfigError(f"key 'num_generations': must be >= 2 (a group baseline needs other samples), "
                          f"got {config.num_generations}")
    rollout = config.prompts_per_step * config.num_generations
    mini = config.mini_batch_size or rollout
    if rollout % mini:
        raise ConfigError(f"key 'mini_batch_size': must divide prompts_per_step x num_generations ({rollout}), "
                          f"got {config.mini_batch_size}")
    if mini % config.gradient_accumulation_steps:
        raise ConfigError(f"key 'gradient_accumulation_steps': must divide the mini-batch ({mini} completions), "
                          f"got {config.gradient_accumulation_steps}")
    if config.clip_eps_high is not None and config.clip_eps_high < 0:
        raise ConfigError(f"key 'clip_eps_high': must be >= 0, got {config.clip_eps_high}")
    if not 0 <= config.clip_eps <= 1:
        raise ConfigError(f"key 'clip_eps': must be in [0, 1], got {config.clip_eps}")
