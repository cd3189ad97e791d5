"""Every validation rule, through load_records on JSONL so that messages carry file and line."""

import json

import pytest

from rlhfkit.data import KINDS, validate_record
from rlhfkit.data.loading import load_records
from rlhfkit.errors import DataError, UserError

GOOD = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
CONV = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]


def error_for(tmp_path, record, kind, line=2):
    """Write a good record then `record` on line 2 (or later); return the DataError's message."""
    good = {"prompt": {"prompt": "p"}, "sft": {"prompt": "p", "completion": "c"},
            "preference": GOOD, "ranking": {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}}[kind]
    lines = [json.dumps(good)] * (line - 1) + [json.dumps(record)]
    path = tmp_path / "file.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    assert isinstance(info.value, UserError)
    assert info.value.line == line
    return str(info.value)


def test_kinds():
    assert KINDS == ("prompt", "sft", "preference", "ranking")
    with pytest.raises(ValueError, match="unknown record kind 'dpo'"):
        validate_record({}, "dpo", "x.jsonl", 1)


def test_normalises_and_drops_unknown_fields():
    record = {"prompt": CONV + [], "chosen": [{"role": "assistant", "content": "Hey", "name": "bot"}],
              "rejected": "No.", "margin": 2, "source": "web"}
    out = validate_record(record, "preference", "f.jsonl", 1)
    assert out == {"prompt": CONV, "chosen": [{"role": "assistant", "content": "Hey"}],
                   "rejected": "No.", "margin": 2.0}
    assert isinstance(out["margin"], float)


def test_not_an_object(tmp_path):
    msg = error_for(tmp_path, ["prompt", "x"], "prompt")
    assert msg == f"{tmp_path / 'file.jsonl'}:2: expected a JSON object, got a list"


def test_missing_field(tmp_path):
    msg = error_for(tmp_path, {"prompt": "Hi", "chosen": "a"}, "preference", line=3)
    assert msg == (f"{tmp_path / 'file.jsonl'}:3: field 'rejected': "
                   "missing (a preference record needs prompt, chosen, rejected)")


def test_null_counts_as_missing(tmp_path):
    assert "field 'prompt': missing" in error_for(tmp_path, {"prompt": None}, "prompt")


def test_wrong_type(tmp_path):
    msg = error_for(tmp_path, {"prompt": "Hi", "chosen": 3, "rejected": "b"}, "preference")
    assert msg.endswith("file.jsonl:2: field 'chosen': must be a string or a list of assistant messages, "
                        "got a number")
    msg = error_for(tmp_path, {"prompt": {"text": "x"}}, "prompt")
    assert msg.endswith("field 'prompt': must be a string or a list of messages, got an object")


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_string(tmp_path, text):
    msg = error_for(tmp_path, {"prompt": "p", "completion": text}, "sft")
    assert msg.endswith("file.jsonl:2: field 'completion': must not be empty")


def test_empty_conversation(tmp_path):
    assert error_for(tmp_path, {"prompt": []}, "prompt").endswith("field 'prompt': must not be empty")


def test_bad_role(tmp_path):
    prompt = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}, {"role": "user", "content": "c"}]
    msg = error_for(tmp_path, {"prompt": prompt}, "prompt")
    assert msg.endswith("file.jsonl:2: field 'prompt[1].role': unknown role 'bot' "
                        "(expected one of: system, user, assistant)")


def test_message_shape(tmp_path):
    msg = error_for(tmp_path, {"prompt": [{"role": "user"}]}, "prompt")
    assert msg.endswith("field 'prompt[0].content': missing")
    msg = error_for(tmp_path, {"prompt": ["hello"]}, "prompt")
    assert msg.endswith("field 'prompt[0]': must be an object with 'role' and 'content', got a string")
    msg = error_for(tmp_path, {"prompt": [{"role": "user", "content": ""}]}, "prompt")
    assert msg.endswith("field 'prompt[0].content': must not be empty")


def test_conversational_prompt_must_end_with_user(tmp_path):
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    msg = error_for(tmp_path, {"prompt": prompt}, "prompt")
    assert msg.endswith("field 'prompt': a conversational prompt must end with a user turn, got 'assistant'")


def test_system_only_first(tmp_path):
    prompt = [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]
    msg = error_for(tmp_path, {"prompt": prompt}, "prompt")
    assert msg.endswith("field 'prompt[1].role': a system turn is only allowed as the first turn")
    assert validate_record({"prompt": CONV}, "prompt", "f", 1) == {"prompt": CONV}


def test_conversational_responses(tmp_path):
    user = [{"role": "user", "content": "Hi"}]
    ok = validate_record({"prompt": user, "chosen": "plain is fine",
                          "rejected": [{"role": "assistant", "content": "no"}]}, "preference", "f", 1)
    assert ok["chosen"] == "plain is fine"
    msg = error_for(tmp_path, {"prompt": user, "chosen": "a",
                               "rejected": [{"role": "user", "content": "no"}]}, "preference")
    assert msg.endswith("field 'rejected[0].role': a response may only contain assistant turns, got 'user'")
    # After a plain prompt a response must be plain too.
    msg = error_for(tmp_path, {"prompt": "Hi", "completion": [{"role": "assistant", "content": "x"}]}, "sft")
    assert msg.endswith("field 'completion': must be a string when the prompt is plain text, got a list")


def test_messages_form(tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    assert validate_record({"messages": msgs, "prompt": "ignored"}, "sft", "f", 1) == {"messages": msgs}
    msg = error_for(tmp_path, {"messages": msgs[:2]}, "sft")
    assert msg.endswith("field 'messages': the last turn must be an assistant turn, got 'user'")
    msg = error_for(tmp_path, {"messages": [msgs[0], msgs[2]]}, "sft")
    assert msg.endswith("field 'messages': needs a user turn before the last assistant turn")
    msg = error_for(tmp_path, {"messages": msgs[1:] + msgs[2:]}, "sft")
    assert msg.endswith("field 'messages': the turn before the last assistant turn must be a user turn, "
                        "got 'assistant'")
    msg = error_for(tmp_path, {"text": "x"}, "sft")
    assert msg.endswith("field 'completion': missing (an sft record needs prompt and completion, or messages)")


@pytest.mark.parametrize("ranking, field, message", [
    ([0, 3], "ranking[1]", "index 3 is out of range for 3 responses"),
    ([-1, 0], "ranking[0]", "index -1 is out of range for 3 responses"),
    ([2, 0, 2], "ranking[2]", "index 2 appears more than once"),
    ([True, 0], "ranking[0]", "must be an integer index, got a boolean"),
    ([0, 1.0], "ranking[1]", "must be an integer index, got a number"),
    ([1], "ranking", "must rank at least 2 responses, got 1"),
    ("0,1", "ranking", "must be a list of response indices (best first), got a string"),
])
def test_ranking_errors(tmp_path, ranking, field, message):
    msg = error_for(tmp_path, {"prompt": "p", "responses": ["a", "b", "c"], "ranking": ranking}, "ranking")
    assert msg.endswith(f"file.jsonl:2: field '{field}': {message}")


def test_ranking_subset_and_responses(tmp_path):
    out = validate_record({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0]}, "ranking", "f", 1)
    assert out["ranking"] == [2, 0]
    msg = error_for(tmp_path, {"prompt": "p", "responses": ["a"], "ranking": [0, 1]}, "ranking")
    assert msg.endswith("field 'responses': needs at least 2 responses, got 1")
    msg = error_for(tmp_path, {"prompt": "p", "responses": ["a", 3], "ranking": [0, 1]}, "ranking")
    assert msg.endswith("field 'responses[1]': must be a string or a list of assistant messages, got a number")


def test_compared_responses_may_be_empty_but_completions_and_prompts_may_not(tmp_path):
    """A policy that ends its turn at once gives an empty response: annotators rank it like any other."""
    out = validate_record({"prompt": "p", "responses": ["a", ""], "ranking": [1, 0]}, "ranking", "f", 1)
    assert out["responses"] == ["a", ""]
    out = validate_record({"prompt": "p", "chosen": "yes", "rejected": ""}, "preference", "f", 1)
    assert out["rejected"] == ""
    assert error_for(tmp_path, {"prompt": "p", "completion": " "}, "sft").endswith("'completion': must not be empty")
    assert error_for(tmp_path, {"prompt": "", "chosen": "a", "rejected": "b"},
                     "preference").endswith("'prompt': must not be empty")


@pytest.mark.parametrize("margin, message", [
    ("1", "must be a number, got a string"),
    (True, "must be a number, got a boolean"),
])
def test_margin_type(tmp_path, margin, message):
    msg = error_for(tmp_path, dict(GOOD, margin=margin), "preference")
    assert msg.endswith(f"field 'margin': {message}")


def test_margin_not_finite(tmp_path):
    # json accepts the non-standard NaN / Infinity literals, so they must be caught here.
    path = tmp_path / "file.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": Infinity}\n')
    with pytest.raises(DataError, match=r"file.jsonl:1: field 'margin': must be a finite number, got inf"):
        load_records(path, "preference")
