"""`rlhfkit dpo` on the tiny model: it learns a preference rule, writes a loadable policy, and the reference
can be scored once up front instead of being held in memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.dpo import run_dpo

from .helpers import keyword_pairs, tiny_config, write_jsonl


def test_dpo_learns_the_preferred_keyword(tmp_path):
    """Chosen responses carry 'excellent' where rejected ones carry 'terrible': on held-out pairs the
    implicit reward beta * log(pi / ref) must order them, which it cannot at step 0 (policy == reference)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(160, seed=3))
    out = tmp_path / "dpo"
    run_dpo(tiny_config("dpo", data=data, output_dir=out, progress=False, max_steps=30, eval_every=30,
                        eval_fraction=0.2, max_samples=0, learning_rate=3e-3, beta=0.1, save_every=0))
    rows = read_metrics(out / "metrics.jsonl")
    last = rows[-1]
    for key in ("loss", "dpo/margin", "dpo/accuracy", "dpo/chosen_reward", "dpo/rejected_reward", "grad_norm"):
        assert key in rows[0], key
    assert rows[0]["dpo/accuracy"] == 0.5 and rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["eval/accuracy"] > 0.9, last
    assert last["eval/margin"] > 0.5 and last["eval/loss"] < 0.5, last
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_precomputed_reference_gives_the_same_training(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(40, seed=4))
    common = dict(data=data, progress=False, max_steps=4, eval_every=2, save_every=0)
    run_dpo(tiny_config("dpo", output_dir=tmp_path / "held", **common))
    run_dpo(tiny_config("dpo", output_dir=tmp_path / "pre", precompute_ref_logprobs=True, **common))
    held, pre = read_metrics(tmp_path / "held" / "metrics.jsonl"), read_metrics(tmp_path / "pre" / "metrics.jsonl")
    for a, b in zip(held, pre):
        for key in ("loss", "dpo/margin", "eval/loss", "eval/accuracy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a[key], b[key])
    a, b = load_file(tmp_path / "held" / "model.safetensors"), load_file(tmp_path / "pre" / "model.safetensors")
    # The two runs' gradients differ only by rounding (the reference scored in other batches), and AdamW moves a
    # weight by at most about the learning rate (1e-3 in the tiny preset) per step: the weights must agree to a
    # hundredth of one step.
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-2 * 1e-3) for k in a)


def test_ipo_and_bad_settings(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(24, seed=5))
    out = tmp_path / "ipo"
    run_dpo(tiny_config("dpo", data=data, output_dir=out, progress=False, max_steps=2, loss_type="ipo",
                        save_every=0))
    # IPO at step 0: h = 0, so the loss is (0 - 1 / (2 beta))^2 = 25 with beta 0.1.
    assert read_metrics(out / "metrics.jsonl")[0]["loss"] == pytest.approx(25.0, rel=1e-4)
    assert main(["dpo", "--preset", "tiny", "--data", str(data), "--loss-type", "hinge",
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "loss_type" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["dpo", "--preset", "tiny", "--output-dir", str(tmp_path / "y")]) == 2
    assert "--data is required" in capsys.readouterr().err
