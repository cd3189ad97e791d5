"""Rollout layout and scoring: the (B, R) tensors line up with the response tokens."""

import pytest
import torch

from rlhfkit.core.logprobs import logprobs_from_logits
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.generate import cut_at_eos
from rlhfkit.rollout.scoring import RewardScorer, response_logprobs, response_values
from tests.tolerances import close


def test_layout_left_pads_prompts_and_right_pads_responses():
    batch = build_rollout_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [True, False], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids[1].tolist() == [0, 0, 0, 1, 2, 3]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.responses.tolist() == [[1, 2, 0], [3, 4, 9]]
    # A sub-batch drops the columns that are padding in all its rows (and keeps responses aligned).
    short_prompt = batch.select([1])
    assert short_prompt.input_ids.tolist() == [[8, 3, 4, 9]] and short_prompt.prompt_width == 1
    assert short_prompt.position_ids.tolist() == [[0, 1, 2, 3]]
    short_response = batch.select([0])
    assert short_response.input_ids.tolist() == [[5, 6, 7, 1, 2]] and short_response.response_mask.tolist() == [[1, 1]]
    assert batch.select([0, 1]).input_ids.tolist() == batch.input_ids.tolist()


def test_micro_batches_group_similar_lengths_and_cover_all_rows():
    batch = build_rollout_batch([[1], [1, 2, 3], [1], [1, 2, 3]], [[5], [5, 6, 7], [5], [5, 6, 7]], [True] * 4, 0)
    chunks = list(batch.micro_batches(torch.tensor([0, 1, 2, 3]), 2))
    assert sorted(sum((idx.tolist() for idx, _ in chunks), [])) == [0, 1, 2, 3]
    assert [sub.input_ids.shape for _, sub in chunks] == [(2, 2), (2, 6)]


def test_length_buckets_cover_all_rows_trimmed_and_score_as_the_whole_batch(tokenizer, tiny_model):
    prompts = [[11], [11, 12, 13, 14, 15, 16], [11], [11, 12, 13, 14, 15, 16, 17]]
    responses = [[5], [5, 6, 7, 8, 9, 10, 11, 12], [5, 6], [5, 6, 7, 8, 9, 10, 11]]
    batch = build_rollout_batch(prompts, responses, [True] * 4, tokenizer.pad_token_id)
    buckets = list(batch.length_buckets(overhead=0))
    assert sorted(sum((rows.tolist() for rows, _ in buckets), [])) == [0, 1, 2, 3]
    assert [sub.input_ids.shape for _, sub in buckets] == [(1, 2), (1, 3), (2, 15)]
    assert [list(rows.tolist()) for rows, _ in batch.length_buckets(overhead=None)] == [[0, 1, 2, 3]]
    with torch.no_grad():
        whole = response_logprobs(tiny_model, batch)[0]
        for rows, sub in buckets:
            part = response_logprobs(tiny_model, sub)[0]
            close(part, whole[rows, :part.shape[1]], tiny_model.config.hidden_size, len(tokenizer))


def test_cut_at_eos_keeps_the_eos():
    assert cut_at_eos([4, 5, 2, 7, 2], {2}) == ([4, 5, 2], True)
    assert cut_at_eos([4, 5], {2}) == ([4, 5], False)


def test_response_logprobs_match_a_full_forward_of_each_row_alone(tokenizer, tiny_model):
    """Scoring through the padded layout equals scoring each unpadded sequence on its own."""
    prompts = [tokenizer("Hello there friend", add_special_tokens=False)["input_ids"], [tokenizer.eos_token_id + 100]]
    responses = [[300, 301], [400, 401, 402, 403]]
    batch = build_rollout_batch(prompts, responses, [False, False], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(tiny_model, batch, temperature=0.7, with_entropy=True)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([prompt + response])
            logits = tiny_model(input_ids=ids).logits[:, len(prompt) - 1:-1]
            alone = logprobs_from_logits(logits, torch.tensor([response]), temperature=0.7)[0]
            # a log-prob is a logit (a dot product over the hidden size) minus a logsumexp over the vocabulary
            close(logprobs[row, :len(response)], alone, tiny_model.config.hidden_size, len(tokenizer))
    assert logprobs.shape == entropy.shape == (2, 4)


def test_values_are_read_before_each_response_token(tokenizer, tiny_model, tmp_path):
    from rlhfkit.models.reward_model import load_reward_model, score_sequences

    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    critic = load_reward_model(tmp_path / "m", tokenizer.pad_token_id).eval()
    prompt, response = [500, 501, 502], [600, 601]
    batch = build_rollout_batch([prompt, [700]], [response, [800]], [True, True], tokenizer.pad_token_id)
    with torch.no_grad():
        values = response_values(critic, batch)
        # V at response token t is the score of the sequence that ends just before it.
        v0 = score_sequences(critic, torch.tensor([prompt]), torch.ones(1, 3, dtype=torch.long))
        v1 = score_sequences(critic, torch.tensor([prompt + response[:1]]), torch.ones(1, 4, dtype=torch.long))
        scorer = RewardScorer(critic, tokenizer, tokenizer, max_prompt_length=16)
        full = scorer(batch, ["a", "b"], ["x", "y"])
        alone = score_sequences(critic, torch.tensor([prompt + response]), torch.ones(1, 5, dtype=torch.long))
    hidden = critic.config.hidden_size  # a score is a dot product over the hidden size, after layers of the same
    close(values[0], torch.cat([v0, v1]), hidden, hidden)
    close(full[0], alone[0], hidden, hidden)
    assert scorer.reuse_ids



@pytest.mark.parametrize("own_logit_path", [False, True])
def test_fused_head_scores_only_response_tokens_and_matches_full_logits(tiny_model, tokenizer, own_logit_path):
    """response_logprobs sends only the response tokens through the fused LM head: on them it equals
    log_softmax of the full fp32 logits (values and gradients), and it is 0 on the padding after a short response.
    Models whose logits are more than lm_head(hidden) take their own forward, with the same results."""
    import copy

    from rlhfkit.rollout.scoring import has_own_logit_path, tail_logits

    if own_logit_path:
        tiny_model = copy.deepcopy(tiny_model)
        tiny_model.config.logit_scale = 1.0  # Llama ignores it; enough to route through the model's own forward
    assert has_own_logit_path(tiny_model) == own_logit_path

    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("How are you doing today?")["input_ids"]]
    batch = build_rollout_batch(prompts, [[5, 6, 7, 8], [9, 10]], [True, False], tokenizer.pad_token_id)
    mask = batch.response_mask.bool()
    logprobs, entropy = response_logprobs(tiny_model, batch, temperature=0.7, with_entropy=True)
    weight = tiny_model.get_output_embeddings().weight
    (ours,) = torch.autograd.grad((logprobs + 0.1 * entropy).sum(), weight)
    logits = tail_logits(tiny_model, batch.input_ids, batch.attention_mask, batch.position_ids, mask.shape[1])
    log_p = torch.log_softmax(logits / 0.7, dim=-1)
    expected = log_p.gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)
    expected_entropy = -(log_p.exp() * log_p).sum(-1)
    (reference,) = torch.autograd.grad(((expected + 0.1 * expected_entropy) * mask).sum(), weight)
    assert mask.sum() == 6 and not mask.all()
    # Both sides reduce over the hidden size (the logits) and the vocabulary (logsumexp, the entropy's sum), with
    # other kernels (chunks of rows against the whole batch): the tolerance follows those sizes and the values'.
    hidden, vocab = tiny_model.config.hidden_size, weight.shape[0]
    close(logprobs[mask], expected[mask], hidden, vocab)
    close(entropy[mask], expected_entropy[mask], hidden, vocab)
    assert (logprobs[~mask] == 0).all() and (entropy[~mask] == 0).all()
    close(ours, reference, hidden, vocab, int(mask.sum()))  # each weight row's gradient also sums over the tokens
