"""bf16 storage of a frozen model's Linear weights: same results under autocast, half the memory."""

import copy

import torch

from rlhfkit.models.precision import store_linears_in_bf16
from rlhfkit.runtime.precision import autocast
from rlhfkit.models.reward_model import load_reward_model, score_sequences
from rlhfkit.models.loading import resolve_model_path
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.scoring import tail_logits


def response_logits(model, batch):
    return tail_logits(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask.shape[1])


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


def test_bf16_weights_runs_plain_bf16_and_restores_the_exact_fp32_tensors(tiny_model, tokenizer):
    from rlhfkit.models.precision import bf16_weights

    model = tiny_model.eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    batch = _batch(tokenizer)
    with torch.no_grad(), autocast("bf16"):
        reference = response_logits(model, batch)
        with bf16_weights(model):
            assert not torch.is_autocast_enabled("cpu")  # plain bf16: no autocast dispatch per op
            dtypes = {name: p.dtype for name, p in model.named_parameters()}
            plain = response_logits(model, batch)
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.1.input_layernorm.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16  # the tied LM head too, as inference engines run it
    assert plain.dtype == torch.float32  # bf16 logits, upcast
    # Same model, another rounding: close to the autocast logits, not equal.
    assert (plain - reference).abs().max() < 0.05 * reference.abs().max()
    assert not torch.equal(plain, reference)
    # On exit: the same Parameter objects (an optimizer holds them) with their fp32 values, bit for bit.
    assert all(p is params[name] for name, p in model.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert not model.get_input_embeddings()._forward_hooks


def test_bf16_weights_restores_after_an_error(tiny_model):
    from rlhfkit.models.precision import bf16_weights

    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    try:
        with bf16_weights(tiny_model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    for name, p in tiny_model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert not tiny_model.get_input_embeddings()._forward_hooks
