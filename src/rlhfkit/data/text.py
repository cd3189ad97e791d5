"""Plain text of prompts and responses, for scorers that read text (gold scorers, VADER)."""

from __future__ import annotations


def prompt_text(prompt) -> str:
    """A plain prompt as is; for a conversation, its last user turn (what the response answers)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def response_text(response) -> str:
    """A plain response as is; assistant messages joined by newlines."""
    if isinstance(response, str):
        return response
    return "\n".join(message["content"] for message in response)
