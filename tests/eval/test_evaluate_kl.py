"""The evaluation's exact KL (summed over the vocabulary at every response position) against its sampled k1
estimate: never negative, and equal in expectation, checked with a tolerance that follows the standard error."""

import json
import math

import pytest
import torch

from rlhfkit.eval.evaluate import run_eval
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.tiny import build_tiny_model

from ..trainers.helpers import tiny_config, write_jsonl


@pytest.fixture(scope="module")
def peaked_reference(tmp_path_factory):
    """A tiny model of another seed whose (tied) embeddings are scaled up: its next-token distributions are far
    more peaked than the policy's near-uniform ones, so KL(policy || reference) is several nats a response."""
    folder = tmp_path_factory.mktemp("peaked")
    tokenizer = load_tokenizer("tiny")
    model = build_tiny_model(tokenizer, seed=5)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_exact_kl_is_never_negative_and_agrees_with_the_sampled_estimate(tmp_path, peaked_reference):
    k = 8
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about the {w}"} for w in
                                                 "sun moon river tree house cat dog road hill sea sky wind".split()])
    out = tmp_path / "ev"
    run_eval(tiny_config("eval", data=prompts, output_dir=out, ref_model=peaked_reference, samples_per_prompt=k,
                         max_new_tokens=6, temperature=0.8, progress=False))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    exact = torch.tensor([r["kl_exact"] for r in rows], dtype=torch.float64)
    sampled = torch.tensor([r["kl"] for r in rows], dtype=torch.float64)
    assert (exact >= 0).all()
    # Both estimate KL(pi || pi_ref) of the whole response: E[sum_t (log p - log q)(y_t)] = E[sum_t KL_t] (chain
    # rule), so their difference has mean 0. Samples of one prompt share it, so the standard error is over prompts.
    diff = (sampled - exact).view(-1, k).mean(1)
    se = diff.std(unbiased=True).item() / math.sqrt(diff.numel())
    assert abs(diff.mean().item()) <= 4 * se, (diff.mean().item(), se)
    # The check has power: an error of a quarter of the KL (a wrong temperature, a reversed KL) would be seen.
    assert 4 * se < 0.25 * exact.mean().item(), (se, exact.mean().item())
    # Rao-Blackwellised: the exact per-token KL removes the sampling noise of each token's log-ratio.
    assert exact.std() < sampled.std()
    result = json.loads((out / "eval.json").read_text())
    assert result["kl_exact_mean"] == pytest.approx(exact.mean().item(), rel=1e-9)
    assert result["kl_to_reference_mean"] == pytest.approx(sampled.mean().item(), rel=1e-9)
    lo, hi = result["kl_exact_ci95"]
    assert 0 <= lo <= result["kl_exact_mean"] <= hi


def test_against_itself_the_exact_kl_is_zero_without_scoring(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "Good day"}])
    out = tmp_path / "ev"
    run_eval(tiny_config("eval", data=prompts, output_dir=out, samples_per_prompt=2, max_new_tokens=6, progress=False))
    result = json.loads((out / "eval.json").read_text())
    assert result["kl_exact_mean"] == 0.0 and result["kl_exact_ci95"] == [0.0, 0.0]
    assert all(json.loads(x)["kl_exact"] == 0.0 for x in (out / "samples.jsonl").read_text().splitlines())
