"""Guarded training: a non-finite loss skips the update and is counted; too many in a row stop the run with
a clear message, the checkpoints intact and no NaN weights written."""

import math

import pytest
import torch
from safetensors.torch import load_file

import rlhfkit.trainers.sft as sft
from rlhfkit.errors import UserError
from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.sft import run_sft

from .helpers import tiny_config, write_jsonl


def poison_steps(monkeypatch, bad_steps: set[int]):
    """Make the SFT loss NaN at the given (1-based) optimizer steps (batch 4, no accumulation)."""
    real, calls = sft.sft_loss, [0]

    def loss(model, batch, normaliser):
        calls[0] += 1
        value, metrics = real(model, batch, normaliser)
        return (value * float("nan"), metrics) if calls[0] in bad_steps else (value, metrics)

    monkeypatch.setattr(sft, "sft_loss", loss)


def _data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f"A {i % 7}"} for i in range(20)])


def test_a_nan_step_is_skipped_counted_and_changes_nothing(tmp_path, monkeypatch):
    common = dict(data=_data(tmp_path), max_steps=4, batch_size=4, progress=False, save_every=0, eval_every=0,
                  lr_scheduler="constant", warmup_ratio=0.0)
    run_sft(tiny_config("sft", output_dir=tmp_path / "clean", **dict(common, max_steps=2)))
    with monkeypatch.context() as patch:
        poison_steps(patch, {3, 4})  # steps 3 and 4 are skipped: the weights stay those after step 2
        run_sft(tiny_config("sft", output_dir=tmp_path / "nan", **common))
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 2]
    assert rows[2]["loss"] is None and all(math.isfinite(r["loss"]) for r in rows[:2])  # NaN is logged as null
    clean, guarded = load_file(tmp_path / "clean" / "model.safetensors"), load_file(tmp_path / "nan" / "model.safetensors")
    assert all(torch.equal(clean[k], guarded[k]) for k in clean)


def test_too_many_bad_steps_in_a_row_stop_with_checkpoints_intact(tmp_path, monkeypatch):
    common = dict(data=_data(tmp_path), max_steps=8, batch_size=4, progress=False, save_every=2, eval_every=0,
                  max_bad_steps=2, keep_last_n=0)
    with monkeypatch.context() as patch:
        poison_steps(patch, {2, 4, 5, 6})  # step 2 alone is tolerated; 4 and 5 in a row stop the run
        with pytest.raises(UserError, match=r"steps 4-5: 2 steps in a row had a non-finite loss"):
            run_sft(tiny_config("sft", output_dir=tmp_path / "r", **common))
    checkpoints = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-4"] and not (tmp_path / "r" / "model.safetensors").exists()
    for name in checkpoints:
        weights = load_file(tmp_path / "r" / "checkpoints" / name / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["train/skipped_steps"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [0, 1, 1, 2, 3]
