"""Render records to token ids: chat templates, EOS, truncation and the SFT loss mask.

Rendering
- A plain-text prompt is wrapped as one user turn and rendered with the tokenizer's chat template
  (``add_generation_prompt=True``) when ``use_chat_template`` is on and the tokenizer has a template;
  otherwise the raw text is used (with the BOS token the tokenizer itself would add, if any).
- A conversational prompt is rendered with the chat template. Without one (or with
  ``use_chat_template=False``) it falls back to lines ``"role: content"`` followed by ``"assistant: "``.
- ``system_prompt`` (templates only): None leaves the template's own default (SmolLM2's adds a 22-token
  system turn when a conversation has none); a string, even empty, becomes the system turn of every
  conversation that has none of its own.
- A response is its text tokenised without special tokens, followed by ``eos_token_id``. For ChatML
  (SmolLM2) that is exactly the assistant turn ``content<|im_end|>``, so generation stops where the
  template would close the turn. A response of several assistant messages is rendered with the
  template as the text between the prompt and the final end of turn.

Truncation (the same for SFT and each side of a preference pair)
- The prompt is cut from the LEFT to at most ``max_prompt_length`` tokens: the end of the prompt,
  nearest the response, is what the model needs most.
- The response (EOS included) is cut from the RIGHT so that prompt + response <= ``max_length``; a cut
  response loses its EOS too, so the model is never taught to stop mid-sentence.
- If the (cut) prompt leaves no room for even one response token (``max_length - len(prompt) < 1``),
  `TooLongError` (a ``ValueError``) is raised; callers that know the record's file and line should
  convert it to a `DataError`, or skip the record.
"""

from __future__ import annotations


class TooLongError(ValueError):
    """The prompt alone fills max_length: no response token would fit."""


def _has_template(tokenizer, use_chat_template: bool) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, text: str) -> list[int]:
    # No special tokens: templates already spell theirs (e.g. <|im_start|>) in the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; responses need one to end")
    return eos


def _as_messages(prompt, system_prompt: str | None = None) -> list[dict]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompt(tokenizer, prompt, use_chat_template: bool = True, system_prompt: str | None = None) -> str:
    """The prompt as the text the model sees before its response (see the module docstring)."""
    if _has_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template(_as_messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def _prompt_ids_untruncated(tokenizer, prompt, use_chat_template: bool, system_prompt: str | None) -> list[int]:
    text = render_prompt(tokenizer, prompt, use_chat_template, system_prompt)
    ids = _encode(tokenizer, text)
    if not _has_template(tokenizer, use_chat_template):
        # Raw text: keep the BOS the tokenizer adds on its own (Llama does, GPT-2 and SmolLM2 do not);
        # never a trailing EOS, which would end the turn before the response.
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            with_special = tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(with_special) > 0 and with_special[0] == bos:
                ids = [bos] + ids
    return ids


def tokenize_prompt(tokenizer, prompt, max_prompt_length: int, use_chat_template: bool = True,
                    system_prompt: str | None = None) -> list[int]:
    """Prompt ids, length <= max_prompt_length, cut from the LEFT (the end is kept).

    `prompt` is plain text or a list of messages. Returns a list of P ints, P <= max_prompt_length.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    ids = _prompt_ids_untruncated(tokenizer, prompt, use_chat_template, system_prompt)
    return ids[-max_prompt_length:]


def _response_text(tokenizer, prompt, response, use_chat_template: bool, system_prompt: str | None) -> str:
    if isinstance(response, str):
        return response
    if len(response) == 1:
        return response[0]["content"]
    # Several assistant turns: let the template join them, then take what follows the prompt.
    if _has_template(tokenizer, use_chat_template):
        messages = _as_messages(prompt, system_prompt)
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + list(response), tokenize=False)
        if full.startswith(head):
            text = full[len(head):].rstrip()
            eos = tokenizer.eos_token
            # The last end-of-turn is added back as eos_token_id, exactly once.
            if eos and text.endswith(eos):
                text = text[: -len(eos)]
            return text
    return "\n\n".join(m["content"] for m in response)


def tokenize_response(tokenizer, response, prompt=None, use_chat_template: bool = True,
                      system_prompt: str | None = None) -> list[int]:
    """Response ids followed by eos_token_id, untruncated. `prompt` only matters for responses made of
    several assistant messages (they are rendered in the context of the prompt's template)."""
    text = _response_text(tokenizer, prompt, response, use_chat_template, system_prompt)
    return _encode(tokenizer, text) + [_eos_id(tokenizer)]


def _room(prompt_ids: list[int], max_length: int) -> int:
    room = max_length - len(prompt_ids)
    if room < 1:
        raise TooLongError(f"the prompt takes {len(prompt_ids)} tokens, leaving no room for a response "
                           f"within max_length={max_length} (lower max_prompt_length below max_length)")
    return room


def _check_lengths(max_prompt_length: int, max_length: int) -> None:
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(f"need max_prompt_length >= 1 and max_length >= 2, "
                         f"got {max_prompt_length} and {max_length}")


def _split_sft(record: dict):
    """(prompt, completion) of an sft record; a messages record splits before its last turn."""
    if "messages" in record and "completion" not in record:
        return record["messages"][:-1], record["messages"][-1]["content"]
    return record["prompt"], record["completion"]


def tokenize_sft(tokenizer, record: dict, max_prompt_length: int, max_length: int,
                 use_chat_template: bool = True, system_prompt: str | None = None) -> dict:
    """One SFT example: ``{"input_ids": list[int] (L,), "loss_mask": list[int] (L,)}``, L <= max_length.

    input_ids = prompt (cut from the left to max_prompt_length) + completion + EOS (cut from the right
    to fit max_length; a cut completion has no EOS). loss_mask is 1 exactly on the completion tokens
    (EOS included), 0 on the prompt. Raises `TooLongError` if no completion token fits.
    """
    _check_lengths(max_prompt_length, max_length)
    prompt, completion = _split_sft(record)
    prompt_ids = tokenize_prompt(tokenizer, prompt, max_prompt_length, use_chat_template, system_prompt)
    room = _room(prompt_ids, max_length)
    completion_ids = tokenize_response(tokenizer, completion, prompt, use_chat_template, system_prompt)[:room]
    return {"input_ids": prompt_ids + completion_ids,
            "loss_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def tokenize_preference(tokenizer, record: dict, max_prompt_length: int, max_length: int,
                        use_chat_template: bool = True, system_prompt: str | None = None) -> dict:
    """One preference pair: ``{"prompt_ids" (P,), "chosen_ids" (C,), "rejected_ids" (R,)}`` as int lists,
    with P <= max_prompt_length, P + C <= max_length and P + R <= max_length; ``"margin"`` (float) is
    passed through when the record has one. Each response ends with EOS unless it was cut.
    Raises `TooLongError` if no response token fits.
    """
    _check_lengths(max_prompt_length, max_length)
    prompt = record["prompt"]
    prompt_ids = tokenize_prompt(tokenizer, prompt, max_prompt_length, use_chat_template, system_prompt)
    room = _room(prompt_ids, max_length)
    out = {"prompt_ids": prompt_ids,
           "chosen_ids": tokenize_response(tokenizer, record["chosen"], prompt, use_chat_template,
                                           system_prompt)[:room],
           "rejected_ids": tokenize_response(tokenizer, record["rejected"], prompt, use_chat_template,
                                             system_prompt)[:room]}
    if record.get("margin") is not None:
        out["margin"] = float(record["margin"])
    return out
