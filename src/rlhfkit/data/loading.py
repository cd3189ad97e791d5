"""Read records from JSONL/JSON, Parquet or a `datasets` folder, validating every one.

Every problem with the input raises `DataError` naming the file, the line (JSONL: 1-based line number;
JSON array: element index + 1; Parquet and datasets: 1-based row number) and the field, so that the
CLI can print one line the user can act on. Nothing here downloads anything.

In columnar formats (Parquet, datasets) a null cell means "absent", since a column exists for every
row: an optional ``margin`` may be null, a required field may not.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from rlhfkit.data.formats import KINDS, validate_record
from rlhfkit.errors import DataError

# Columns a columnar file must have for each kind; sft accepts either alternative.
_COLUMNS = {
    "prompt": (("prompt",),),
    "sft": (("prompt", "completion"), ("messages",)),
    "preference": (("prompt", "chosen", "rejected"),),
    "ranking": (("prompt", "responses", "ranking"),),
}


def load_records(path, kind: str, keep_extra: bool = False) -> list[dict]:
    """All records of `kind` in `path`, validated and normalised (see `formats.validate_record`).

    `path` is a ``.jsonl`` file (one JSON object per line, blank lines skipped), a ``.json`` file
    (JSONL, or one top-level array of objects, or a single object), a ``.parquet`` file, or a folder
    written by ``datasets.Dataset.save_to_disk``. Raises `DataError` for a missing path, an unknown
    file type, unreadable content, an invalid record, or no records at all. With `keep_extra`, a record's
    other fields (e.g. an `answer` for a verifiable reward) are kept beside the normalised ones.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (expected one of: {', '.join(KINDS)})")
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        rows = _read_dataset_folder(path, kind)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path, kind)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path, path.read_bytes())
    elif path.suffix == ".json":
        rows = _read_json(path)
    else:
        raise DataError(path, None, None, f"unsupported file type '{path.suffix}' "
                                          "(expected .jsonl, .json, .parquet or a datasets folder)")
    records = [validate_record(record, kind, path, line) for line, record in rows]
    if keep_extra:
        records = [{**{k: v for k, v in raw.items() if k not in record}, **record} if isinstance(raw, dict)
                   else record for (_, raw), record in zip(rows, records)]
    if not records:
        raise DataError(path, None, None, "no records")
    return records


def load_prompts(path) -> list[dict]:
    """Prompt records ``{"prompt": ...}`` from any file that has a ``prompt`` field (prompt, sft with
    prompt/completion, preference or ranking files all do; other fields are ignored)."""
    return load_records(path, "prompt")


def _read_jsonl(path: Path, data: bytes) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line. Only b"\\n" ends a line, as JSONL says;
    decoding per line lets an invalid UTF-8 byte be reported with its line."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            # utf-8-sig on the first line forgives the byte-order mark some editors write.
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(path, number, None, f"invalid UTF-8 at byte {exc.start + 1} of the line") from None
        if not text.strip():
            continue
        rows.append((number, _parse(path, number, text)))
    return rows


def _parse(path: Path, line: int, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, line, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        # Thousands of nested brackets exhaust json's recursion; still the user's input.
        raise DataError(path, line, None, "invalid JSON: nested too deeply") from None


def _read_json(path: Path) -> list[tuple[int, object]]:
    """A .json file is one array of records, one object, or JSONL by another name."""
    data = path.read_bytes()
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # Not one JSON document: read it line by line, which also locates the error.
        return _read_jsonl(path, data)
    if isinstance(value, list):
        return [(index + 1, item) for index, item in enumerate(value)]
    return [(1, value)]


def _columnar_rows(path: Path, kind: str, columns: list[str], rows: list[dict]) -> list[tuple[int, dict]]:
    """Check the columns once (a missing column is a file-level mistake), then number the rows."""
    alternatives = _COLUMNS[kind]
    if not any(all(c in columns for c in needed) for needed in alternatives):
        missing = next(c for c in alternatives[0] if c not in columns)
        shown = ", ".join(columns) if columns else "none"
        raise DataError(path, None, missing, f"column missing (the file has columns: {shown})")
    # Null cells mean "absent" (e.g. no margin for this row).
    return [(number, {k: v for k, v in row.items() if v is not None})
            for number, row in enumerate(rows, start=1)]


def _read_parquet(path: Path, kind: str) -> list[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(path, None, None, f"cannot read Parquet: {_first_line(exc)}") from None
    return _columnar_rows(path, kind, table.column_names, table.to_pylist())


def _read_dataset_folder(path: Path, kind: str) -> list[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    # datasets raises many exception types here; every one means "not a readable folder".
    except Exception as exc:  # noqa: BLE001
        raise DataError(path, None, None,
                        f"not a folder saved by datasets' save_to_disk: {_first_line(exc)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        # A DatasetDict: use its train split, or its only split.
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise DataError(path, None, None, f"a DatasetDict with splits {', '.join(dataset)}; "
                                              "give the folder of one split")
    return _columnar_rows(path, kind, list(dataset.column_names), dataset.to_list())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _corpus_files() -> list:
    from importlib.resources import files

    folder = files("chatterbot_corpus") / "data" / "english"
    # Sorted names make the record order (and so every seeded split) identical on every machine.
    return sorted((f for f in folder.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)


@functools.lru_cache(maxsize=1)
def _corpus_pairs() -> tuple[tuple[str, str], ...]:
    """(prompt, response) from each chatterbot conversation: its first two strings, stripped.
    Cached: the corpus is installed and read-only, and parsing it takes a noticeable fraction of a second."""
    import yaml

    # The C safe loader when PyYAML has it: same safety as yaml.safe_load, several times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    pairs = []
    for file in _corpus_files():
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=loader)
        if not isinstance(data, dict):
            continue
        for conversation in data.get("conversations") or []:
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            prompt, response = conversation[0], conversation[1]
            # YAML turns some answers into numbers or booleans ("yes"); they are not text we can use.
            if not isinstance(prompt, str) or not isinstance(response, str):
                continue
            prompt, response = prompt.strip(), response.strip()
            if prompt and response:
                pairs.append((prompt, response))
    return tuple(pairs)


def load_chatterbot_sft() -> list[dict]:
    """SFT records ``{"prompt", "completion"}`` from the installed chatterbot English corpus (~2,000
    short question/answer pairs), in a fixed order (sorted file names, then file order)."""
    return [{"prompt": p, "completion": c} for p, c in _corpus_pairs()]


def load_chatterbot_prompts() -> list[dict]:
    """Prompt records ``{"prompt"}`` from the chatterbot corpus, in a fixed order, duplicates removed
    (a prompt repeated across files would otherwise leak between train and evaluation splits)."""
    seen: dict[str, None] = {}
    for prompt, _ in _corpus_pairs():
        seen.setdefault(prompt, None)
    return [{"prompt": p} for p in seen]
