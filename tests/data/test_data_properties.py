"""Property tests: valid records round-trip through JSONL; junk always gives DataError, never a crash."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.data import KINDS, load_records
from rlhfkit.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip)


def message(role):
    return st.builds(lambda c: {"role": role, "content": c}, text)


@st.composite
def conversation(draw):
    """Optional system turn, then user/assistant turns opening with a user turn, ending with a user turn."""
    turns = draw(st.lists(st.sampled_from(["user", "assistant"]), max_size=3))
    turns = ["user", *turns[1:]] if turns else turns
    head = [draw(message("system"))] if draw(st.booleans()) else []
    return head + [draw(message(r)) for r in turns] + [draw(message("user"))]


@st.composite
def record(draw, kind):
    conversational = draw(st.booleans())
    prompt = draw(conversation() if conversational else text)
    response = (st.one_of(text, st.lists(message("assistant"), min_size=1, max_size=2))
                if conversational else text)
    if kind == "prompt":
        return {"prompt": prompt}
    if kind == "sft":
        if conversational and draw(st.booleans()):
            return {"messages": prompt + [draw(message("assistant"))]}
        return {"prompt": prompt, "completion": draw(response)}
    if kind == "preference":
        out = {"prompt": prompt, "chosen": draw(response), "rejected": draw(response)}
        if draw(st.booleans()):
            out["margin"] = draw(st.one_of(st.integers(-1000, 1000),
                                           st.floats(allow_nan=False, allow_infinity=False)))
        return out
    responses = draw(st.lists(response, min_size=2, max_size=5))
    order = draw(st.permutations(range(len(responses))))
    return {"prompt": prompt, "responses": responses,
            "ranking": order[: draw(st.integers(2, len(responses)))]}


@st.composite
def kind_and_records(draw):
    kind = draw(st.sampled_from(KINDS))
    return kind, draw(st.lists(record(kind), min_size=1, max_size=5))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


@SETTINGS
@given(data=kind_and_records(), ascii_only=st.booleans(), extra=st.booleans(),
       suffix=st.sampled_from([".jsonl", ".json"]))
def test_valid_records_round_trip(folder, data, ascii_only, extra, suffix):
    kind, records = data
    path = folder / f"records{suffix}"
    lines = [json.dumps(dict(r, note="ignored") if extra else r, ensure_ascii=ascii_only) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_records(path, kind) == records


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=10)


def _has_content(line: bytes) -> bool:
    """False if every piece of `line` is blank (load_records skips blank lines: they are not junk)."""
    try:
        return any(part.strip() for part in line.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        return True


# Lines that can never be a valid preference record: no "prompt" key, or not an object, or not JSON.
junk_line = st.one_of(
    st.binary(min_size=1, max_size=60),
    st.text(min_size=1, max_size=60),
    json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "prompt"), json_values, max_size=4).map(json.dumps),
).map(lambda v: v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")).filter(_has_content)


@SETTINGS
@given(good=st.lists(record("preference"), max_size=2), junk=st.lists(junk_line, min_size=1, max_size=3),
       suffix=st.sampled_from([".jsonl", ".json"]))
def test_junk_lines_always_raise_data_error(folder, good, junk, suffix):
    path = folder / f"junk{suffix}"
    path.write_bytes(b"\n".join([json.dumps(r).encode() for r in good] + junk) + b"\n")
    with pytest.raises(DataError):
        load_records(path, "preference")


fields = st.sampled_from(["prompt", "completion", "messages", "chosen", "rejected", "margin", "responses",
                          "ranking", "role", "content"])
message_like = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                   "content": json_values})
fuzz_values = st.one_of(json_values, st.lists(message_like, max_size=3), st.lists(st.integers(-2, 5), max_size=4))


@SETTINGS
@given(kind=st.sampled_from(KINDS),
       objects=st.lists(st.dictionaries(fields, fuzz_values, max_size=5), min_size=1, max_size=3))
def test_random_objects_validate_or_raise_data_error(folder, kind, objects):
    path = folder / "fuzz.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n", encoding="utf-8")
    try:
        records = load_records(path, kind)
    except DataError as exc:
        assert str(exc).startswith(str(path))
    else:
        assert len(records) == len(objects)
