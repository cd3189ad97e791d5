"""load_records over JSONL, JSON, Parquet and datasets folders; file-level errors; the chatterbot corpus."""

import json

import pytest

from rlhfkit.data import (
    load_chatterbot_prompts,
    load_chatterbot_sft,
    load_prompts,
    load_records,
)
from rlhfkit.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_dataset(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, "data.jsonl"), "parquet": (write_parquet, "data.parquet"),
           "datasets": (write_dataset, "data_folder")}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


S = {"role": "system", "content": "You are terse."}

RECORDS = {
    ("prompt", "plain"): [{"prompt": "Hello there"}, {"prompt": "What is 2+2?"}],
    ("prompt", "conv"): [{"prompt": [S, U("Hi")]}, {"prompt": [U("a"), A("b"), U("c")]}],
    ("sft", "plain"): [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}],
    ("sft", "conv"): [{"prompt": [U("Q1")], "completion": [A("A1")]},
                      {"prompt": [S, U("Q2")], "completion": [A("A2")]}],
    ("sft", "messages"): [{"messages": [U("Q1"), A("A1")]}, {"messages": [S, U("Q2"), A("x"), U("y"), A("A2")]}],
    ("preference", "plain"): [{"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 1.5},
                              {"prompt": "R", "chosen": "yes", "rejected": "no"}],
    ("preference", "conv"): [{"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]},
                             {"prompt": [S, U("R")], "chosen": [A("yes")], "rejected": [A("no")]}],
    ("ranking", "plain"): [{"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
                           {"prompt": "R", "responses": ["x", "y", "z"], "ranking": [1, 2]}],
    ("ranking", "conv"): [{"prompt": [U("Q")], "responses": [[A("a")], [A("b")]], "ranking": [1, 0]},
                          {"prompt": [U("R")], "responses": [[A("x")], [A("y")]], "ranking": [0, 1]}],
}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
@pytest.mark.parametrize("kind, style", list(RECORDS))
def test_every_format_round_trips(tmp_path, fmt, kind, style):
    writer, name = WRITERS[fmt]
    records = RECORDS[(kind, style)]
    path = writer(tmp_path / name, records)
    assert load_records(path, kind) == records


def test_extra_fields_ignored_and_null_margin_absent(tmp_path):
    records = [{"prompt": "Q", "chosen": "a", "rejected": "b", "id": 7, "margin": None}]
    for path in (write_jsonl(tmp_path / "d.jsonl", records), write_parquet(tmp_path / "d.parquet", records)):
        assert load_records(path, "preference") == [{"prompt": "Q", "chosen": "a", "rejected": "b"}]


def test_blank_lines_crlf_and_bom_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n   \n{"prompt": "b"}\r\n\n')
    assert load_records(path, "prompt") == [{"prompt": "a"}, {"prompt": "b"}]


def test_malformed_json_names_line_3(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n{"prompt": "c"}\n')
    with pytest.raises(DataError) as info:
        load_records(path, "prompt")
    assert str(info.value) == f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 16)"
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 3, None)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:2: invalid UTF-8 at byte 16 of the line$"):
        load_records(path, "prompt")


def test_deeply_nested_json_is_a_data_error(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text("[" * 100000 + "\n")
    with pytest.raises(DataError, match=r"file\.jsonl:1: invalid JSON"):
        load_records(path, "prompt")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_records(path, "prompt")
    assert str(info.value) == f"{path}: no records"


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found$"):
        load_records(tmp_path / "nope.jsonl", "prompt")
    (tmp_path / "d.csv").write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type '\.csv'"):
        load_records(tmp_path / "d.csv", "prompt")
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records(tmp_path / "d.csv", "prompts")


def test_json_array_single_object_and_jsonl(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    assert load_records(array, "prompt") == [{"prompt": "a"}, {"prompt": "b"}]
    single = tmp_path / "s.json"
    single.write_text('{\n  "prompt": "only"\n}\n')
    assert load_records(single, "prompt") == [{"prompt": "only"}]
    lines = tmp_path / "l.json"
    lines.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_records(lines, "prompt") == [{"prompt": "a"}, {"prompt": "b"}]
    # In an array, "line" is the element's 1-based index.
    array.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}, {"prompt": 5}]))
    with pytest.raises(DataError, match=r"a\.json:3: field 'prompt': must be a string or a list of messages"):
        load_records(array, "prompt")
    bad = tmp_path / "b.json"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"b\.json:2: invalid JSON"):
        load_records(bad, "prompt")


def test_parquet_missing_column(tmp_path):
    path = write_parquet(tmp_path / "file.parquet", [{"prompt": "Q", "chosen": "a", "answer": "b"}])
    with pytest.raises(DataError) as info:
        load_records(path, "preference")
    assert str(info.value) == f"{path}: field 'rejected': column missing (the file has columns: prompt, chosen, answer)"
    assert info.value.field == "rejected"


def test_sft_columns_either_form(tmp_path):
    path = write_parquet(tmp_path / "file.parquet", [{"prompt": "Q"}])
    with pytest.raises(DataError, match=r"file\.parquet: field 'completion': column missing"):
        load_records(path, "sft")


def test_parquet_bad_row_names_row_number(tmp_path):
    rows = [{"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": " "}]
    path = write_parquet(tmp_path / "file.parquet", rows)
    with pytest.raises(DataError) as info:
        load_records(path, "sft")
    assert str(info.value) == f"{path}:2: field 'completion': must not be empty"
    wrong = write_parquet(tmp_path / "wrong.parquet", [{"prompt": 1}, {"prompt": 2}])
    expected = r"wrong\.parquet:1: field 'prompt': must be a string or a list of messages, got a number"
    with pytest.raises(DataError, match=expected):
        load_records(wrong, "prompt")


def test_unreadable_parquet_and_folder(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read Parquet: "):
        load_records(path, "prompt")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder: not a folder saved by datasets' save_to_disk: "):
        load_records(folder, "prompt")


def test_datasets_folder_bad_row_and_dict(tmp_path):
    import datasets

    path = write_dataset(tmp_path / "ds", [{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 1]},
                                           {"prompt": "b", "responses": ["x", "y"], "ranking": [1, 1]}])
    with pytest.raises(DataError, match=r"ds:2: field 'ranking\[1\]': index 1 appears more than once$"):
        load_records(path, "ranking")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "t"}]),
                               "test": datasets.Dataset.from_list([{"prompt": "e"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", "prompt") == [{"prompt": "t"}]


def test_load_prompts_from_a_preference_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS[("preference", "plain")])
    assert load_prompts(path) == [{"prompt": "Q"}, {"prompt": "R"}]


def test_chatterbot_corpus():
    sft = load_chatterbot_sft()
    assert len(sft) > 1000
    # sports.yml: "- - I PLAY Cricket / - Which position do you like to play?"
    assert {"prompt": "I PLAY Cricket", "completion": "Which position do you like to play?"} in sft
    # Stripped: the corpus has "EACH YEAR IN PRO BASEBALL THE " with a trailing space.
    assert {"prompt": "EACH YEAR IN PRO BASEBALL THE", "completion": "The Gold Glove."} in sft
    assert all(isinstance(r["prompt"], str) and r["prompt"] and r["completion"] for r in sft)
    assert sft[0]["prompt"] == "What is AI?"  # ai.yml sorts first
    assert load_chatterbot_sft() == sft  # deterministic
    prompts = load_chatterbot_prompts()
    assert len(prompts) == len({p["prompt"] for p in prompts}) > 500
    assert {"prompt": "I PLAY Cricket"} in prompts
