"""Data: record formats and validation, loading (JSONL, JSON, Parquet, datasets folders, the embedded
chatterbot corpus), rankings -> preference pairs, tokenisation with chat templates, left-padded collation.

Errors in user data raise `rlhfkit.errors.DataError` (file, line, field); `tokenize_*` raise
`TooLongError` (a ValueError) when a prompt leaves no room for a response, for callers to convert.
"""

from rlhfkit.data.collate import collate_pairs, collate_prompts, collate_sft, left_pad
from rlhfkit.data.formats import KINDS, ROLES, is_conversational, validate_record
from rlhfkit.data.loading import (
    load_chatterbot_prompts,
    load_chatterbot_sft,
    load_prompts,
    load_records,
)
from rlhfkit.data.rankings import ranking_to_pairs, rankings_to_preferences
from rlhfkit.data.tokenize import (
    TooLongError,
    render_prompt,
    tokenize_preference,
    tokenize_prompt,
    tokenize_response,
    tokenize_sft,
)

__all__ = [
    "KINDS", "ROLES", "TooLongError", "collate_pairs", "collate_prompts", "collate_sft",
    "is_conversational", "left_pad", "load_chatterbot_prompts", "load_chatterbot_sft", "load_prompts",
    "load_records", "ranking_to_pairs", "rankings_to_preferences", "render_prompt", "tokenize_preference",
    "tokenize_prompt", "tokenize_response", "tokenize_sft", "validate_record",
]
