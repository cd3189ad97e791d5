"""Tokenisation with SmolLM2's real tokenizer (ChatML, eos <|im_end|> = 2): templates, EOS, truncation, masks."""

import pytest

from rlhfkit.data import (
    TooLongError,
    render_prompt,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
HI = SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
HELLO_WORLD = [28120, 905]  # "hello world" without special tokens
EOS = 2


def test_plain_prompt_uses_chat_template(tokenizer):
    assert render_prompt(tokenizer, "hi") == HI
    ids = tokenize_prompt(tokenizer, "hi", 1000)
    text = tokenizer.decode(ids)
    assert text == HI
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert len(ids) == 31 and ids[0] == 1  # <|im_start|> is one special token, not characters


def test_prompt_left_truncation_keeps_the_end(tokenizer):
    full = tokenize_prompt(tokenizer, "hi", 1000)
    cut = tokenize_prompt(tokenizer, "hi", 6)
    assert cut == full[-6:]
    assert tokenizer.decode(cut) == "<|im_end|>\n<|im_start|>assistant\n"
    long_text = " ".join(f"w{i}" for i in range(200))
    cut = tokenize_prompt(tokenizer, long_text, 20, use_chat_template=False)
    assert len(cut) == 20 and tokenizer.decode(cut).endswith("w199")
    with pytest.raises(ValueError):
        tokenize_prompt(tokenizer, "hi", 0)


def test_raw_prompt_without_template(tokenizer):
    assert tokenize_prompt(tokenizer, "hello world", 100, use_chat_template=False) == HELLO_WORLD
    conv = [U("Hi"), A("Hey"), U("Bye")]
    assert render_prompt(tokenizer, conv, use_chat_template=False) == "user: Hi\nassistant: Hey\nuser: Bye\nassistant: "


def test_conversational_prompt_with_own_system(tokenizer):
    prompt = [{"role": "system", "content": "Be kind."}, U("hi")]
    text = tokenizer.decode(tokenize_prompt(tokenizer, prompt, 1000))
    assert text == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_replaces_the_templates_default_only_where_a_conversation_has_none(tokenizer):
    empty = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, "hi", system_prompt="") == empty
    ids = tokenize_prompt(tokenizer, "hi", 1000, system_prompt="")
    assert tokenizer.decode(ids) == empty and len(ids) == 15  # 31 with SmolLM2's default system turn
    short = tokenize_prompt(tokenizer, [U("hi")], 1000, system_prompt="Be brief.")
    assert tokenizer.decode(short).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    # A conversation's own system turn wins; None keeps the template's default; no template: no system line.
    own = [{"role": "system", "content": "Be kind."}, U("hi")]
    assert tokenize_prompt(tokenizer, own, 1000, system_prompt="") == tokenize_prompt(tokenizer, own, 1000)
    assert tokenize_prompt(tokenizer, "hi", 1000, system_prompt=None) == tokenize_prompt(tokenizer, "hi", 1000)
    assert tokenize_prompt(tokenizer, "hello world", 100, False, system_prompt="x") == HELLO_WORLD
    # SFT and preference records render their prompt the same way, so every stage sees the same prompt.
    sft = tokenize_sft(tokenizer, {"prompt": "hi", "completion": "hello world"}, 100, 200, system_prompt="")
    assert sft["input_ids"][:15] == ids and sft["loss_mask"] == [0] * 15 + [1] * 3
    pair = tokenize_preference(tokenizer, {"prompt": "hi", "chosen": "a", "rejected": "b"}, 100, 200,
                               system_prompt="")
    assert pair["prompt_ids"] == ids


def test_sft_appends_eos_and_masks_completion_exactly(tokenizer):
    out = tokenize_sft(tokenizer, {"prompt": "hi", "completion": "hello world"}, 100, 200)
    assert out["input_ids"] == tokenize_prompt(tokenizer, "hi", 100) + HELLO_WORLD + [EOS]
    assert out["loss_mask"] == [0] * 31 + [1] * 3
    # Same ids as the template renders the whole conversation (ChatML closes the turn with <|im_end|>\n).
    full = tokenizer.apply_chat_template([U("hi"), A("hello world")], tokenize=False)
    assert tokenizer.decode(out["input_ids"]) == full.rstrip("\n")


def test_sft_completion_truncated_from_the_right_drops_eos(tokenizer):
    out = tokenize_sft(tokenizer, {"prompt": "hi", "completion": "hello world"}, 100, 32)
    assert out["input_ids"][-1] == HELLO_WORLD[0] and len(out["input_ids"]) == 32
    assert out["loss_mask"] == [0] * 31 + [1]
    out = tokenize_sft(tokenizer, {"prompt": "hi", "completion": "hello world"}, 10, 12)
    assert out["input_ids"] == tokenize_prompt(tokenizer, "hi", 10) + HELLO_WORLD
    assert out["loss_mask"] == [0] * 10 + [1, 1]
    out = tokenize_sft(tokenizer, {"prompt": "hi", "completion": "hello world"}, 10, 13)
    assert out["input_ids"][-1] == EOS and len(out["input_ids"]) == 13


def test_too_long_prompt(tokenizer):
    expected = "the prompt takes 31 tokens, leaving no room for a response within max_length=31"
    with pytest.raises(TooLongError, match=expected):
        tokenize_sft(tokenizer, {"prompt": "hi", "completion": "x"}, 100, 31)
    assert issubclass(TooLongError, ValueError)
    with pytest.raises(TooLongError):
        tokenize_preference(tokenizer, {"prompt": "hi", "chosen": "a", "rejected": "b"}, 40, 31)


def test_sft_messages_split_before_last_assistant(tokenizer):
    msgs = [U("hi"), A("yo"), U("again"), A("hello world")]
    out = tokenize_sft(tokenizer, {"messages": msgs}, 1000, 1000)
    prompt = tokenize_prompt(tokenizer, msgs[:3], 1000)
    assert out["input_ids"] == prompt + HELLO_WORLD + [EOS]
    assert sum(out["loss_mask"]) == 3 and out["loss_mask"][: len(prompt)] == [0] * len(prompt)
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")


def test_preference_each_side_truncated_and_margin(tokenizer):
    record = {"prompt": "hi", "chosen": "hello world", "rejected": "hello world hello world", "margin": 0.5}
    out = tokenize_preference(tokenizer, record, 100, 34)
    assert out["prompt_ids"] == tokenize_prompt(tokenizer, "hi", 100)
    assert out["chosen_ids"] == HELLO_WORLD + [EOS]  # 31 + 3 fits exactly
    assert len(out["rejected_ids"]) == 3 and out["rejected_ids"][-1] != EOS
    assert out["margin"] == 0.5
    assert "margin" not in tokenize_preference(tokenizer, {"prompt": "hi", "chosen": "a", "rejected": "b"}, 100, 100)


def test_conversational_responses(tokenizer):
    record = {"prompt": [U("hi")], "chosen": [A("hello world")], "rejected": [A("a"), A("b")]}
    out = tokenize_preference(tokenizer, record, 100, 100)
    assert out["chosen_ids"] == HELLO_WORLD + [EOS]
    # Several assistant turns: joined by the template, one EOS at the very end.
    assert tokenizer.decode(out["rejected_ids"]) == "a<|im_end|>\n<|im_start|>assistant\nb<|im_end|>"


class CharTokenizer:
    """No chat template; one id per character; adds BOS 1 with special tokens, like Llama."""

    chat_template = None
    bos_token_id = 1
    eos_token_id = 2
    eos_token = "</s>"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_tokenizer_without_template_keeps_its_bos():
    tok = CharTokenizer()
    assert tokenize_prompt(tok, "ab", 10) == [1, 97, 98]
    assert tokenize_prompt(tok, "abc", 2) == [98, 99]  # the left cut can remove BOS too
    out = tokenize_sft(tok, {"prompt": "ab", "completion": "c"}, 10, 10)
    assert out == {"input_ids": [1, 97, 98, 99, 2], "loss_mask": [0, 0, 0, 1, 1]}
