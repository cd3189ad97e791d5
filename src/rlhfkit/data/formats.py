"""Record kinds and their validation (the TRL conventions, checked strictly, with precise errors).

Kinds (one JSON object per record; unknown extra fields are allowed and dropped):

- ``prompt``:     ``{"prompt": P}``
- ``sft``:        ``{"prompt": P, "completion": R}`` or ``{"messages": [m, ..., assistant]}``
- ``preference``: ``{"prompt": P, "chosen": R, "rejected": R}``, optional finite number ``"margin"``
- ``ranking``:    ``{"prompt": P, "responses": [R, R, ...], "ranking": [best, ..., worst]}``

A prompt ``P`` is plain text (a non-empty string) or conversational: a non-empty list of messages
``{"role": "system"|"user"|"assistant", "content": str}`` where a system turn may only come first, the
first other turn is a user turn, and the last turn is a user turn (the model answers next). A response ``R`` is a non-empty string; when
the prompt is conversational it may also be a list of assistant messages.

A text field holds at most `MAX_TEXT_CHARS` characters: far more than any context rlhfkit trains on (the
rest would be cut away by truncation anyway), and a bigger one is nearly always a file that lost its line
breaks; tokenising it would take minutes and gigabytes before the cut.

`validate_record` returns a new, normalised dict: only the known fields, messages reduced to
``{"role", "content"}``, ``margin`` as a float and ranking indices as ints. Every failure raises
`DataError(path, line, field, message)`; nested fields are named like ``prompt[1].role``.
"""

from __future__ import annotations

import math
import numbers

from rlhfkit.errors import DataError

KINDS = ("prompt", "sft", "preference", "ranking")
ROLES = ("system", "user", "assistant")
MAX_TEXT_CHARS = 1 << 20


class _Where:
    """The file and line a record came from, so that every check can raise a located error."""

    def __init__(self, path, line):
        self.path = path
        self.line = line

    def fail(self, field, message):
        raise DataError(self.path, self.line, field, message)


def _type_name(value) -> str:
    # Names a user recognises whatever the file format (JSON, Parquet, datasets).
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text(value, field: str, where: _Where) -> str:
    if not isinstance(value, str):
        where.fail(field, f"must be a string, got {_type_name(value)}")
    if len(value) > MAX_TEXT_CHARS:
        where.fail(field, f"is {len(value):,} characters long, over the limit of {MAX_TEXT_CHARS:,} "
                          f"(is a line break missing?)")
    # Whitespace-only text would train on (or compare) nothing visible: treat it as empty.
    if not value.strip():
        where.fail(field, "must not be empty")
    return value


def _shown(text: str, limit: int = 40) -> str:
    # A value quoted in an error stays short: the message is one line a user reads, whatever the input.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _messages(value, field: str, where: _Where) -> list[dict]:
    """A non-empty list of {"role", "content"} with known roles and non-empty string contents."""
    if not isinstance(value, (list, tuple)):
        where.fail(field, f"must be a list of messages, got {_type_name(value)}")
    if len(value) == 0:
        where.fail(field, "must not be empty")
    out = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            where.fail(name, f"must be an object with 'role' and 'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                where.fail(f"{name}.{key}", "missing")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            shown = _shown(role) if isinstance(role, str) else _type_name(role)
            where.fail(f"{name}.role", f"unknown role {shown} (expected one of: {', '.join(ROLES)})")
        if role == "system" and i != 0:
            where.fail(f"{name}.role", "a system turn is only allowed as the first turn")
        out.append({"role": role, "content": _text(message["content"], f"{name}.content", where)})
    return out


def _check_opening(messages: list[dict], field: str, where: _Where) -> None:
    """The first turn after an optional system turn is the user's. A conversation the assistant opens is
    refused here, with its line, because many chat templates (Llama 2, Mistral, Gemma) raise on it only
    at tokenisation, far from the file."""
    first = 1 if messages[0]["role"] == "system" else 0
    if first < len(messages) and messages[first]["role"] != "user":
        where.fail(f"{field}[{first}].role", f"a conversation must open with a user turn (after an optional "
                                             f"system turn), got '{messages[first]['role']}'")


def _prompt(value, field: str, where: _Where):
    """Plain text, or messages whose last turn is a user turn (the model speaks next)."""
    if isinstance(value, str):
        return _text(value, field, where)
    if not isinstance(value, (list, tuple)):
        where.fail(field, f"must be a string or a list of messages, got {_type_name(value)}")
    messages = _messages(value, field, where)
    if messages[-1]["role"] != "user":
        where.fail(field, f"a conversational prompt must end with a user turn, "
                          f"got '{messages[-1]['role']}'")
    _check_opening(messages, field, where)
    return messages


def _response(value, field: str, where: _Where, conversational: bool, may_be_empty: bool = False):
    """A string, or (after a conversational prompt only) a list of assistant messages.

    `may_be_empty`: a compared response (preference, ranking) may be the empty string, for a model that
    ended its turn at once is a real outcome to rank; a completion to imitate (SFT) may not."""
    if isinstance(value, str):
        return value if may_be_empty and not value.strip() else _text(value, field, where)
    if not isinstance(value, (list, tuple)):
        where.fail(field, f"must be a string or a list of assistant messages, got {_type_name(value)}")
    if not conversational:
        where.fail(field, "must be a string when the prompt is plain text, got a list")
    messages = _messages(value, field, where)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            where.fail(f"{field}[{i}].role",
                       f"a response may only contain assistant turns, got '{message['role']}'")
    return messages


def _require(record: dict, fields: tuple[str, ...], kind: str, where: _Where) -> None:
    for field in fields:
        # Columnar formats (Parquet, datasets) spell "absent" as null.
        if field not in record or record[field] is None:
            where.fail(field, f"missing (a {kind} record needs {', '.join(fields)})")


def _sft(record: dict, where: _Where) -> dict:
    if record.get("completion") is not None:
        _require(record, ("prompt", "completion"), "sft", where)
        prompt = _prompt(record["prompt"], "prompt", where)
        return {"prompt": prompt,
                "completion": _response(record["completion"], "completion", where, isinstance(prompt, list))}
    if record.get("messages") is None:
        # Neither form: name the field of the commoner form.
        where.fail("completion", "missing (an sft record needs prompt and completion, or messages)")
    messages = _messages(record["messages"], "messages", where)
    if messages[-1]["role"] != "assistant":
        where.fail("messages", f"the last turn must be an assistant turn, got '{messages[-1]['role']}'")
    head = messages[:-1]
    # The turns before the last assistant turn are the prompt, so they obey the prompt rules.
    if not any(m["role"] == "user" for m in head):
        where.fail("messages", "needs a user turn before the last assistant turn")
    if head[-1]["role"] != "user":
        where.fail("messages", f"the turn before the last assistant turn must be a user turn, "
                               f"got '{head[-1]['role']}'")
    _check_opening(messages, "messages", where)
    return {"messages": messages}


def _preference(record: dict, where: _Where) -> dict:
    _require(record, ("prompt", "chosen", "rejected"), "preference", where)
    prompt = _prompt(record["prompt"], "prompt", where)
    conversational = isinstance(prompt, list)
    out = {"prompt": prompt,
           "chosen": _response(record["chosen"], "chosen", where, conversational, may_be_empty=True),
           "rejected": _response(record["rejected"], "rejected", where, conversational, may_be_empty=True)}
    margin = record.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
            where.fail("margin", f"must be a number, got {_type_name(margin)}")
        if not math.isfinite(margin):
            where.fail("margin", f"must be a finite number, got {margin}")
        out["margin"] = float(margin)
    return out


def _ranking(record: dict, where: _Where) -> dict:
    _require(record, ("prompt", "responses", "ranking"), "ranking", where)
    prompt = _prompt(record["prompt"], "prompt", where)
    responses = record["responses"]
    if not isinstance(responses, (list, tuple)):
        where.fail("responses", f"must be a list of responses, got {_type_name(responses)}")
    if len(responses) < 2:
        where.fail("responses", f"needs at least 2 responses, got {len(responses)}")
    responses = [_response(r, f"responses[{i}]", where, isinstance(prompt, list), may_be_empty=True)
                 for i, r in enumerate(responses)]
    ranking = record["ranking"]
    if not isinstance(ranking, (list, tuple)):
        where.fail("ranking", f"must be a list of response indices (best first), got {_type_name(ranking)}")
    if len(ranking) < 2:
        where.fail("ranking", f"must rank at least 2 responses, got {len(ranking)}")
    seen: set[int] = set()
    for i, index in enumerate(ranking):
        # bool is an int subclass in Python; `true` as an index is a mistake, not 1.
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            where.fail(f"ranking[{i}]", f"must be an integer index, got {_type_name(index)}")
        index = int(index)
        if not 0 <= index < len(responses):
            where.fail(f"ranking[{i}]", f"index {index} is out of range for {len(responses)} responses")
        if index in seen:
            where.fail(f"ranking[{i}]", f"index {index} appears more than once")
        seen.add(index)
    return {"prompt": prompt, "responses": responses, "ranking": [int(x) for x in ranking]}


def validate_record(record, kind: str, path, line: int | None) -> dict:
    """Check one record of `kind` and return its normalised copy; raise `DataError` naming the field.

    `path` and `line` only locate the error message (line is 1-based, or a row number, or None).
    An unknown `kind` is a programming error and raises `ValueError`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (expected one of: {', '.join(KINDS)})")
    where = _Where(path, line)
    if not isinstance(record, dict):
        where.fail(None, f"expected a JSON object, got {_type_name(record)}")
    if kind == "prompt":
        _require(record, ("prompt",), "prompt", where)
        return {"prompt": _prompt(record["prompt"], "prompt", where)}
    if kind == "sft":
        return _sft(record, where)
    if kind == "preference":
        return _preference(record, where)
    return _ranking(record, where)


def is_conversational(text) -> bool:
    """True for a list of messages, False for plain text."""
    return isinstance(text, list)
