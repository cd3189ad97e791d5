"""Property tests of the loaders against hostile files (test_data_properties.py covers valid round trips and
junk lines after good ones): whatever the bytes or JSON values, `load_records` returns valid records or
raises `DataError`, never another exception, and the error is one line that names the file and, for
anything on a line, the right line."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.data import KINDS, load_records, validate_record
from rlhfkit.errors import DataError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
# Keys and small values that the validators look at, so that draws get past the first checks often.
keys = st.one_of(st.sampled_from(["prompt", "completion", "messages", "chosen", "rejected", "margin",
                                  "responses", "ranking", "role", "content"]), st.text(max_size=4))
json_values = st.recursive(
    st.one_of(json_scalars, st.sampled_from(["user", "assistant", "system", "hi", ""]), st.integers(-1, 3)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("loader-props")


def first_invalid_line(values, kind, path):
    """1-based index of the first value the validator refuses, else None (the oracle for the line)."""
    for line, value in enumerate(values, start=1):
        try:
            validate_record(value, kind, path, line)
        except DataError:
            return line
    return None


def assert_one_line_naming(exc: DataError, path) -> str:
    message = str(exc)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(str(path))
    return message


@SETTINGS
@given(kind=st.sampled_from(KINDS), values=st.lists(json_values, min_size=1, max_size=6))
def test_arbitrary_json_values_load_or_fail_at_the_first_bad_line(folder, kind, values):
    path = folder / "values.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
    bad = first_invalid_line(values, kind, path)
    try:
        records = load_records(path, kind)
    except DataError as exc:
        message = assert_one_line_naming(exc, path)
        assert bad is not None
        assert exc.line == bad and message.startswith(f"{path}:{bad}: ")
    else:
        assert bad is None and len(records) == len(values)


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json"]))
def test_arbitrary_bytes_load_or_raise_a_located_data_error(folder, kind, data, suffix):
    path = folder / f"bytes{suffix}"
    path.write_bytes(data)
    try:
        records = load_records(path, kind)
    except DataError as exc:
        message = assert_one_line_naming(exc, path)
        if exc.line is None:
            # Only a file with nothing on any line has no line to name.
            assert message == f"{path}: no records"
        else:
            assert 1 <= exc.line <= data.count(b"\n") + 1
            assert message.startswith(f"{path}:{exc.line}: ")
    else:
        assert records and all(isinstance(r, dict) for r in records)


@SETTINGS
@given(kind=st.sampled_from(KINDS), good=st.integers(0, 3), junk=st.binary(min_size=1, max_size=40),
       tail=st.integers(0, 2))
def test_invalid_utf8_is_reported_on_its_own_line(folder, kind, good, junk, tail):
    """A byte that is not UTF-8, after `good` valid lines, is an error on line good + 1, whatever follows."""
    record = {"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b", "responses": ["x", "y"],
              "ranking": [1, 0]}
    lines = [json.dumps(record).encode()] * good + [b'{"prompt": "' + junk.replace(b"\n", b" ") + b'\xff"}']
    lines += [json.dumps(record).encode()] * tail
    path = folder / "utf8.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as caught:
        load_records(path, kind)
    assert caught.value.line == good + 1
    assert str(caught.value).startswith(f"{path}:{good + 1}: invalid UTF-8 at byte")


@SETTINGS
@given(size=st.integers(1 << 20, (1 << 20) + 50), field=st.sampled_from(["prompt", "completion"]))
def test_text_over_the_limit_is_refused_with_its_field(folder, size, field):
    from rlhfkit.data.formats import MAX_TEXT_CHARS

    record = {"prompt": "p", "completion": "c"}
    record[field] = "x" * size
    path = folder / "big.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps(record) + "\n")
    if size <= MAX_TEXT_CHARS:
        assert len(load_records(path, "sft")) == 2
        return
    with pytest.raises(DataError) as caught:
        load_records(path, "sft")
    assert (caught.value.line, caught.value.field) == (2, field)
    assert len(str(caught.value)) < 300
