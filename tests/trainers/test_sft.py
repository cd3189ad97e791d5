import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.models.loading import resolve_model_path
from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.sft import run_sft

from .helpers import tiny_config, write_jsonl


def sft_rows(n=32):
    # A repetitive target the tiny model can learn within a few steps.
    return [{"prompt": f"Count {i}", "completion": "one two three four five"} for i in range(n)]


def test_sft_loss_falls_and_outputs_a_loadable_hf_folder(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    out = tmp_path / "run"
    config = tiny_config("sft", data=data, output_dir=out, max_steps=12, learning_rate=3e-3,
                         eval_every=6, save_every=6, keep_last_n=1, progress=False, eval_fraction=0.25)
    run_sft(config)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0
    evals = [r["eval/nll"] for r in rows if "eval/nll" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "max_steps: 12" in (out / "config.yaml").read_text()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-12"]  # keep_last_n=1 pruned step-6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size > 40000


def test_no_checkpoint_after_the_last_step_when_asked(tmp_path):
    """checkpoint_at_end: false (what a pipeline that deletes checkpoints sets) writes only the save_every ones."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    out = tmp_path / "run"
    run_sft(tiny_config("sft", data=data, output_dir=out, max_steps=3, save_every=2, keep_last_n=0,
                        checkpoint_at_end=False, eval_fraction=0, progress=False))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert (out / "model.safetensors").is_file()


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    """4 x 2 micro-batches with accumulation give the same update as one batch of 8."""
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Q{i} " * (i % 5 + 1), "completion": "A " * (i % 3 + 1)}
                                                 for i in range(8)])
    # With adam_eps >> sqrt(v), Adam's first update is ~ -lr * g / eps: linear in the gradient, so weight
    # deltas compare gradients (a plain Adam step would be ~ sign(g), hiding or inflating differences).
    common = dict(data=data, max_steps=1, eval_fraction=0, progress=False, max_grad_norm=0, save_every=0,
                  learning_rate=1.0, adam_eps=1.0, warmup_ratio=0, lr_scheduler="constant")
    run_sft(tiny_config("sft", output_dir=tmp_path / "big", batch_size=8, gradient_accumulation_steps=1, **common))
    run_sft(tiny_config("sft", output_dir=tmp_path / "acc", batch_size=2, gradient_accumulation_steps=4, **common))
    start = load_file(resolve_model_path("tiny") / "model.safetensors")
    big, acc = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    # The micro-batches of the accumulated run cover the same 8 examples (one epoch, different grouping).
    moved = 0.0
    for key in big:
        d_big, d_acc = big[key] - start[key], acc[key] - start[key]
        assert torch.allclose(d_big, d_acc, atol=2e-8, rtol=1e-3), key  # atol: fp32 rounding of w + dw
        assert (d_big - d_acc).norm() <= 1e-3 * d_big.norm() + 1e-7, key
        moved += d_big.abs().sum().item()
    assert moved > 1e-3
