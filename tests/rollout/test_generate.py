"""The decoding loop: the sampler draws from softmax(logits / T) (within top-p), and decoding with the KV
cache, left padding and finished rows leaving the batch gives the tokens a full forward would choose."""

import math

import pytest
import torch

from rlhfkit.data.collate import collate_prompts
from rlhfkit.rollout.generate import _decode, inverse_cdf, sample_from_logits, sample_responses
from tests.tolerances import close, reduction_atol


def test_sampler_frequencies_match_softmax_at_the_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 2.0, 0.5, 3.0, -1.0])
    n = 200_000
    draws = sample_from_logits(logits.repeat(n, 1), temperature=0.7)
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.softmax(logits.double() / 0.7, dim=0)
    # 5 standard errors of a binomial proportion
    assert torch.all((freq - expected).abs() < 5 * (expected * (1 - expected) / n).sqrt() + 1e-9), (freq, expected)


def test_sampler_top_p_keeps_the_nucleus_and_renormalises():
    torch.manual_seed(1)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 100_000
    draws = sample_from_logits(probs.log().repeat(n, 1), top_p=0.8)
    freq = torch.bincount(draws, minlength=4).double() / n
    # Mass before token 2 is 0.8 >= top_p: tokens 0 and 1 are the nucleus, renormalised to 0.625 / 0.375.
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.625, abs=0.01)
    # The most likely token is always kept, even when it alone exceeds top_p.
    assert sample_from_logits(torch.tensor([[5.0, 0.0, 0.0]]), top_p=0.01).item() == 0


def test_sampler_never_draws_a_zero_probability_token():
    torch.manual_seed(2)
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]]).repeat(10_000, 1)
    assert set(sample_from_logits(logits).tolist()) == {0, 2}


def test_two_level_inverse_cdf_equals_the_full_cumsum_over_many_blocks():
    """Blocks of 256 over a 1000-token vocabulary (last block padded), with whole blocks and single tokens of
    zero mass: the chosen token is the one a full float64 cumsum picks, and never one of zero mass."""
    gen = torch.Generator().manual_seed(4)
    probs = torch.rand(64, 1000, generator=gen) ** 8  # spiky, like an LM's distribution
    probs[:, 256:512] = 0.0  # a whole empty block
    probs[:, ::7] = 0.0
    probs[:, -1] = 0.0  # the last real token, just before the padding
    probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(64, 1, dtype=torch.float64, generator=gen)
    for trial in range(50):
        u = torch.rand(64, 1, dtype=torch.float64, generator=gen)
        got = inverse_cdf(probs, u)
        cdf = probs.double().cumsum(-1)
        want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        assert torch.equal(got, want), trial
        assert (probs.gather(1, got[:, None]) > 0).all()
    # u at the very top of its range still lands on a token of positive mass.
    top = torch.full((64, 1), 1.0 - 2 ** -53, dtype=torch.float64)
    assert (probs.gather(1, inverse_cdf(probs, top)[:, None]) > 0).all()


def test_decoding_logits_equal_full_forwards_with_padding_cache_and_rows_leaving(tokenizer, tiny_model, monkeypatch):
    """Every next-token distribution the loop samples from equals that of a full forward of the row's
    unpadded prompt + tokens so far, including after finished rows leave the batch and the cache."""
    import rlhfkit.rollout.generate as generate

    calls = []

    def recording(logits, temperature, top_p, u=None):
        tokens = sample_from_logits(logits, temperature, top_p, u)
        calls.append((logits.clone(), tokens.clone()))
        return tokens

    monkeypatch.setattr(generate, "sample_from_logits", recording)
    torch.manual_seed(3)
    prompts = [[500, 501, 502, 503, 504], [502], [600, 601], [700, 701, 702], [800, 801], [900]]
    eos = set(range(0, 49152, 5))  # 1 token in 5 ends a response: rows finish at different steps
    got, got_logprobs = _decode(tiny_model.eval(), collate_prompts(prompts, tokenizer.pad_token_id), 8, 1.0, 1.0, eos,
                                with_logprobs=True)
    current, finished, checked = list(range(len(prompts))), set(), 0
    for step, (logits, tokens) in enumerate(calls):
        if len(tokens) < len(current):  # the loop dropped the finished rows, keeping the others' order
            current = [r for r in current if r not in finished]
        assert len(tokens) == len(current)
        for i, row in enumerate(current):
            if row in finished:
                continue
            with torch.no_grad():
                full = tiny_model(input_ids=torch.tensor([prompts[row] + got[row][:step]])).logits[0, -1]
            # KV-cached decoding against a full forward: other kernels, reductions over the hidden size in each of
            # the layers, then (for the log-prob) over the vocabulary
            hidden, vocab = tiny_model.config.hidden_size, full.shape[-1]
            close(logits[i], full, *[hidden] * tiny_model.config.num_hidden_layers)
            assert got[row][step] == int(tokens[i])
            # the sampling pass's log-prob of the token is that of the full forward
            expected = float(torch.log_softmax(full, -1)[got[row][step]])
            assert got_logprobs[row][step] == pytest.approx(expected, abs=reduction_atol(
                torch.float32, *[hidden] * tiny_model.config.num_hidden_layers, vocab, scale=abs(expected)))
            checked += 1
            if int(tokens[i]) in eos:
                finished.add(row)
    assert checked == sum(len(tokens) for tokens in got) == sum(len(lp) for lp in got_logprobs)
    assert len({len(tokens) for tokens in got}) > 1 and any(len(c[1]) < len(prompts) for c in calls)
    assert all((tokens[-1] in eos) or len(tokens) == 8 for tokens in got)


def test_sampling_is_reproducible_and_flags_endings(tokenizer, tiny_model):
    import copy

    tiny_model = copy.deepcopy(tiny_model)
    tiny_model.set_attn_implementation("eager")  # as rlhfkit loads models on the CPU
    prompts = [[500, 501], [502], [503, 504, 505]]
    torch.manual_seed(0)
    first = sample_responses(tiny_model, tokenizer, prompts, max_new_tokens=7, temperature=0.9, batch_size=2)
    torch.manual_seed(0)
    again = sample_responses(tiny_model, tokenizer, prompts, max_new_tokens=7, temperature=0.9, batch_size=2)
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    assert [s.prompt_ids for s in first] == prompts
    assert tiny_model.config._attn_implementation == "eager"  # sdpa only while decoding, then restored
    assert all(1 <= len(s.response_ids) <= 7 for s in first)
    assert all(s.ended == (s.response_ids[-1] == tokenizer.eos_token_id) for s in first)


def test_bf16_sampling_is_reproducible_close_to_autocast_and_leaves_fp32_weights(tokenizer, tiny_model):
    from rlhfkit.runtime.precision import autocast

    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    prompts = [[500, 501], [502], [503, 504, 505]] * 4
    runs = []
    for precision in ("bf16", "bf16", "no"):
        torch.manual_seed(0)
        with autocast("bf16"):
            runs.append(sample_responses(tiny_model, tokenizer, prompts, max_new_tokens=6, precision=precision))
    bf16, again, autocast_run = ([s.response_ids for s in run] for run in runs)
    assert bf16 == again
    # Same seed, same model, another rounding: the first tokens mostly agree (a tiny random model's logits are
    # nearly flat, so a few draws may flip).
    first = [a[0] == b[0] for a, b in zip(bf16, autocast_run)]
    assert sum(first) >= 0.75 * len(first)
    for name, p in tiny_model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def test_a_seeded_sample_is_the_same_whatever_it_is_batched_with(tokenizer, tiny_model):
    """Per-sample seeds (what makes N processes sample what one does): a prompt's response depends on its seed
    only, not on the other prompts of its batch, their number or its place among them; other seeds differ."""
    from rlhfkit.rollout.generate import sample_seeds

    prompts = [[500, 501, 502, 503, 504], [502], [600, 601], [700, 701, 702]]
    seeds = sample_seeds(7, 3, [0, 1, 2, 3])
    assert seeds == sample_seeds(7, 3, [0, 1, 2, 3]) and len(set(seeds)) == 4
    assert seeds[2:] == sample_seeds(7, 3, [2, 3]) and sample_seeds(7, 4, [0]) != seeds[:1]
    model = tiny_model.eval()
    whole = sample_responses(model, tokenizer, prompts, 12, seeds=seeds)
    torch.manual_seed(0)  # the global RNG plays no part
    alone = [sample_responses(model, tokenizer, [p], 12, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    reordered = sample_responses(model, tokenizer, prompts[::-1], 12, seeds=seeds[::-1])[::-1]
    split = sample_responses(model, tokenizer, prompts, 12, seeds=seeds, batch_size=3)
    for got in (alone, reordered, split):
        assert [s.response_ids for s in got] == [s.response_ids for s in whole]
    other = sample_responses(model, tokenizer, prompts, 12, seeds=sample_seeds(8, 3, [0, 1, 2, 3]))
    assert [s.response_ids for s in other] != [s.response_ids for s in whole]
