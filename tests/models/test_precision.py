"""bf16 storage of a frozen model's Linear weights: same results under autocast, half the memory."""

import copy

import torch

from rlhfkit.models.precision import autocast, store_linears_in_bf16
from rlhfkit.models.reward_model import load_reward_model, score_sequences
from rlhfkit.models.loading import resolve_model_path
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.scoring import response_logits


def _batch(tokenizer):
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("How are you doing today?")["input_ids"]]
    return build_rollout_batch(prompts, [[5, 6, 7], [8, 9]], [True, False], tokenizer.pad_token_id)


def test_frozen_lm_gives_bitwise_equal_logits_and_keeps_head_and_norms_fp32(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model).requires_grad_(False).eval()
    batch = _batch(tokenizer)
    with torch.no_grad(), autocast("bf16"):
        before = response_logits(model, batch)
        store_linears_in_bf16(model)
        after = response_logits(model, batch)
    assert torch.equal(before, after)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    assert dtypes["model.norm.weight"] == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32


def test_frozen_reward_model_gives_bitwise_equal_scores(tokenizer):
    rm = load_reward_model(resolve_model_path("tiny"), tokenizer.pad_token_id).requires_grad_(False).eval()
    batch = _batch(tokenizer)
    with torch.no_grad(), autocast("bf16"):
        before = score_sequences(rm, batch.input_ids, batch.attention_mask, batch.position_ids)
        store_linears_in_bf16(rm)
        after = score_sequences(rm, batch.input_ids, batch.attention_mask, batch.position_ids)
    assert torch.equal(before, after)
    assert rm.score.weight.dtype == torch.bfloat16
