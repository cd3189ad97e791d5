"""response_logprobs_and_kl: the evaluation's one scoring pass of policy and reference, giving the sampled tokens'
log-probs (as response_logprobs gives them) and the exact per-token KL (as the full logits give it)."""

import copy

import pytest
import torch

from rlhfkit.core import kl as kl_module
from rlhfkit.models.tiny import build_tiny_model
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.scoring import response_logprobs, response_logprobs_and_kl, tail_logits

from ..tolerances import close


@pytest.mark.parametrize("own_logit_path", [False, True])
@pytest.mark.parametrize("rows_per_chunk", [None, 1, 3])
def test_logprobs_and_exact_kl_match_the_full_logits(tokenizer, tiny_model, own_logit_path, rows_per_chunk,
                                                     monkeypatch):
    ref = build_tiny_model(tokenizer, seed=7).eval()
    tiny_model.eval()
    if own_logit_path:  # models whose logits are more than lm_head(hidden) take their own forward
        tiny_model, ref = copy.deepcopy(tiny_model), copy.deepcopy(ref)
        tiny_model.config.logit_scale = ref.config.logit_scale = 1.0
    vocab = tiny_model.get_output_embeddings().weight.shape[0]
    if rows_per_chunk:
        monkeypatch.setattr(kl_module, "_CHUNK_ELEMENTS", vocab * rows_per_chunk)
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("How are you doing today?")["input_ids"]]
    batch = build_rollout_batch(prompts, [[5, 6, 7, 8], [9, 10]], [True, False], tokenizer.pad_token_id)
    mask = batch.response_mask.bool()
    T = 0.7
    with torch.no_grad():
        logp, logq, kl = response_logprobs_and_kl(tiny_model, ref, batch, temperature=T)
        alone_p, _ = response_logprobs(tiny_model, batch, temperature=T)
        alone_q, _ = response_logprobs(ref, batch, temperature=T)
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, mask.shape[1])
        lp = torch.log_softmax(tail_logits(tiny_model, *args).double() / T, -1)
        lq = torch.log_softmax(tail_logits(ref, *args).double() / T, -1)
    expected = (lp.exp() * (lp - lq)).sum(-1)  # (B, R): the definition, in float64
    hidden = tiny_model.config.hidden_size
    close(logp, alone_p, hidden, vocab)
    close(logq, alone_q, hidden, vocab)
    close(kl[mask], expected[mask].float(), hidden, vocab, vocab)  # logits, logsumexp, then the sum over v
    assert (kl[mask] > 0).all() and (kl[~mask] == 0).all() and (logp[~mask] == 0).all()
    assert kl.shape == logp.shape == mask.shape


def test_a_model_against_itself_has_zero_kl(tokenizer, tiny_model):
    batch = build_rollout_batch([[500, 501]], [[600, 601, 602]], [True], tokenizer.pad_token_id)
    with torch.no_grad():
        logp, logq, kl = response_logprobs_and_kl(tiny_model, tiny_model, batch)
    assert torch.equal(logp, logq) and (kl == 0).all()
