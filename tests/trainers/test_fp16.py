"""fp16 with a dynamic loss scaler (what `mixed_precision: auto` picks on GPUs without bf16, T4 and V100), run
here on the CPU, whose autocast has fp16 too: overflowed steps are skipped, counted and do not stop the run;
the scale travels in checkpoints, so resume stays exact."""

import functools

import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import resolve_model_path
from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.ppo import run_ppo
from rlhfkit.trainers.sft import run_sft

from .helpers import save_random_reward_model, tiny_config, write_jsonl
from .test_resume import assert_crash_and_resume_is_exact


def sft_data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f"A {i % 7}"} for i in range(40)])


def test_overflowing_steps_are_skipped_counted_and_the_scale_comes_down(tmp_path, monkeypatch):
    # Start the scale at 2^40: the scaled gradients overflow fp16 (max 65504) until it has halved enough.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40))
    out = tmp_path / "sft"
    run_sft(tiny_config("sft", data=sft_data(tmp_path), output_dir=out, max_steps=40, batch_size=4, progress=False,
                        save_every=0, eval_every=0, mixed_precision="fp16", learning_rate=1e-3, max_bad_steps=3))
    rows = read_metrics(out / "metrics.jsonl")
    skipped = [r["train/skipped_steps"] for r in rows]
    scales = [r["train/loss_scale"] for r in rows]
    # More overflows in a row than max_bad_steps, yet the run went on: overflows are the scaler's business.
    assert skipped[-1] > 3 and len(rows) == 40
    assert scales[0] == 2.0 ** 39 and scales[-1] < 2.0 ** 24  # halved once per overflow
    assert all(a >= b for a, b in zip(skipped[1:], skipped)) and skipped[-1] == skipped[-10]  # then steps go through
    assert rows[-1]["loss"] < rows[skipped[-1]]["loss"]  # and it learns once the scale fits


def test_fp16_sft_resumes_exactly(tmp_path, monkeypatch):
    common = dict(data=sft_data(tmp_path), max_steps=6, save_every=2, batch_size=4, progress=False, eval_every=0,
                  keep_last_n=0, mixed_precision="fp16", learning_rate=1e-3)
    rows = assert_crash_and_resume_is_exact(
        tmp_path, monkeypatch, run_sft, lambda out, resume: tiny_config("sft", output_dir=out, resume=resume, **common),
        3)
    assert "train/loss_scale" in rows[-1]  # the scaler ran, and its state came back with the checkpoint


def test_fp16_ppo_scales_both_models_losses_with_one_scaler(tmp_path):
    """The critic starts from a reward model whose head is N(0, 1): its scaled value-loss gradients overflow fp16
    at the initial scale of 2^16, and the one scaler shared by policy and critic comes down until they fit."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(16)])
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=save_random_reward_model(tmp_path / "rm"), output_dir=out,
                        progress=False, max_steps=5, save_every=0, sample_every=0, mixed_precision="fp16"))
    rows = read_metrics(out / "metrics.jsonl")
    scales, skipped = [r["train/loss_scale"] for r in rows], [r["train/skipped_steps"] for r in rows]
    assert scales[0] < 65536.0 and skipped[0] >= 1  # overflowed, skipped, halved
    for before, after, s0, s1 in zip(scales, scales[1:], skipped, skipped[1:]):
        assert (after < before) == (s1 > s0)  # the scale falls exactly when updates are skipped
    # Then updates go through: an iteration without a new skip, and the policy moved. (Not "no skip at the end":
    # the critic's gradients stay near fp16's limit at the settled scale, and whether one more overflows depends
    # on the CPU's fp16 kernels and thread count.)
    assert any(s1 == s0 for s0, s1 in zip(skipped, skipped[1:]))
    start, end = load_file(resolve_model_path("tiny") / "model.safetensors"), load_file(out / "model.safetensors")
    assert sum(not torch.equal(start[k], end[k]) for k in start) >= len(start) - 1
