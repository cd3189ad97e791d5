import itertools
import random

import pytest
import torch

from rlhfkit.data.collate import collate_pairs, collate_sft, left_pad
from rlhfkit.data.length_buckets import forward_in_buckets, plan_buckets, real_spans
from tests.tolerances import close


def bucket_cost(spans, buckets, overhead):
    return sum(len(b) * max(spans[i] for i in b) + overhead for b in buckets)


def brute_force_cost(spans, overhead):
    """The cheapest cost over every split of the span-sorted rows into consecutive runs."""
    s = sorted(spans)
    n, best = len(s), float("inf")
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            edges = [0, *cuts, n]
            best = min(best, sum((b - a) * s[b - 1] + overhead for a, b in zip(edges, edges[1:])))
    return best


def test_plan_buckets_by_hand():
    # Two short rows and two long ones: apart they cost 2*2 + 2*10 + 2*1 = 26, together 4*10 + 1 = 41.
    assert plan_buckets([10, 2, 10, 2], overhead=1) == [[1, 3], [0, 2]]
    # A forward dearer than the padding it saves: one bucket, rows shortest first.
    assert plan_buckets([10, 2, 10, 2], overhead=100) == [[1, 3, 0, 2]]
    assert plan_buckets([7], overhead=0) == [[0]]
    assert plan_buckets([], overhead=5) == []


def test_plan_buckets_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        spans = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
        overhead = rng.choice([0, 3, 16, 64])
        buckets = plan_buckets(spans, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(len(spans)))  # every row exactly once
        assert bucket_cost(spans, buckets, overhead) == brute_force_cost(spans, overhead)


def test_real_spans_of_left_right_and_empty_rows():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]])
    first, end = real_spans(mask)
    assert first.tolist() == [2, 0, 4, 1]
    assert end.tolist() == [4, 3, 4, 3]


def toy_batch():
    rows = [[5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4], [2, 3, 4, 5, 6, 7, 8, 9], [8, 8, 8]]
    batch = left_pad(rows, pad_id=0)
    batch["weight"] = torch.arange(5, dtype=torch.float32)  # a (B,) entry
    return batch


def per_row(sub):
    # A function of each row's real tokens alone: their positions weighted by the ids, plus the row's (B,) weight.
    return (sub["input_ids"] * (sub["position_ids"] + 1) * sub["attention_mask"]).sum(1).float() + sub["weight"]


def next_token_products(sub):
    # Per column, k = 1: id at column c times id at c+1 where both are real (as next-token log-probs are).
    both = sub["attention_mask"][:, :-1] * sub["attention_mask"][:, 1:]
    return (sub["input_ids"][:, :-1] * sub["input_ids"][:, 1:] * both).float()


@pytest.mark.parametrize("overhead", [0, 2, 1000])
def test_forward_in_buckets_equals_one_forward(overhead):
    batch = toy_batch()
    calls = []

    def counted(fn):
        def run(sub):
            calls.append(sub["input_ids"].shape)
            return fn(sub)
        return run

    torch.testing.assert_close(forward_in_buckets(counted(per_row), batch, overhead), per_row(batch))
    torch.testing.assert_close(forward_in_buckets(next_token_products, batch, overhead), next_token_products(batch))
    if overhead == 0:  # every distinct length alone, cropped to it
        assert sorted(calls) == sorted(torch.Size([1, n]) for n in (1, 2, 3, 8, 9))
    if overhead == 1000:
        assert calls == [torch.Size([5, 9])]


def test_forward_in_buckets_without_overhead_runs_once_as_given():
    batch, calls = toy_batch(), []
    forward_in_buckets(lambda sub: calls.append(sub) or per_row(sub), batch, None)
    assert len(calls) == 1 and calls[0] is batch


def test_forward_in_buckets_passes_gradients_back_to_each_row():
    batch = toy_batch()
    weight = torch.ones(10, requires_grad=True)

    def fn(sub):
        return (weight[sub["input_ids"]] * sub["attention_mask"]).sum(1)

    forward_in_buckets(fn, batch, overhead=0).sum().backward()
    counts = torch.bincount(batch["input_ids"][batch["attention_mask"].bool()], minlength=10).float()
    torch.testing.assert_close(weight.grad, counts)


def ragged_texts(tokenizer):
    texts = ["Hi", "What is the capital of France, and why is it so large?", "Tell me a joke.",
             "The weather today is awful and I am very sad about it, my friend.", "Ok", "Why?"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_reward_scores_in_buckets_match_one_padded_forward(tokenizer, tmp_path, tiny_model):
    from rlhfkit.models.reward_model import _score, load_reward_model, score_sequences

    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    rm = load_reward_model(tmp_path / "m", tokenizer.pad_token_id).eval()
    batch = left_pad(ragged_texts(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        bucketed = score_sequences(rm, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        whole = _score(rm, batch)
    hidden = rm.config.hidden_size
    close(bucketed, whole, *[hidden] * (rm.config.num_hidden_layers + 1))


def test_sft_and_dpo_log_probs_in_buckets_match_one_padded_forward(tokenizer, tiny_model, monkeypatch):
    import rlhfkit.trainers.dpo as dpo
    import rlhfkit.trainers.sft as sft

    ids = ragged_texts(tokenizer)
    sft_batch = collate_sft([{"input_ids": x, "loss_mask": [0] + [1] * (len(x) - 1)} for x in ids],
                            tokenizer.pad_token_id)
    pairs = collate_pairs([{"prompt_ids": ids[i][:1], "chosen_ids": ids[i][1:] or ids[i],
                            "rejected_ids": ids[-1 - i]} for i in range(3)], tokenizer.pad_token_id)
    tiny_model.eval()
    with torch.no_grad():
        bucketed = sft.completion_logprobs(tiny_model, sft_batch)[0], dpo.pair_logps(tiny_model, pairs)
        monkeypatch.setattr(sft, "bucket_overhead", lambda model: None)
        monkeypatch.setattr(dpo, "bucket_overhead", lambda model: None)
        whole = sft.completion_logprobs(tiny_model, sft_batch)[0], dpo.pair_logps(tiny_model, pairs)
    mask = sft_batch["loss_mask"][:, 1:].bool()
    vocab, hidden = tiny_model.config.vocab_size, tiny_model.config.hidden_size
    close(bucketed[0][mask], whole[0][mask], hidden, hidden, vocab)
    R = int(pairs["response_mask"].sum(1).max())
    for got, want in zip(bucketed[1], whole[1]):
        close(got, want, hidden, hidden, vocab, R)
