"""`gradient_checkpointing: true` trades one more forward per micro-batch for memory; it must not change training:
recomputing a layer replays the same ops on the same inputs, so the weights after training are the same."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models import loading
from rlhfkit.models.loading import resolve_model_path
from rlhfkit.trainers.dpo import run_dpo
from rlhfkit.trainers.ppo import run_ppo

from .helpers import keyword_pairs, save_random_reward_model, tiny_config, write_jsonl


@pytest.fixture()
def checkpointed(monkeypatch):
    """Records every model that gradient checkpointing was turned on for."""
    models = []
    real = loading.set_gradient_checkpointing

    def recording(model, enabled):
        real(model, enabled)
        if enabled:
            models.append(model)
        return model

    for module in ("dpo", "ppo_models"):
        monkeypatch.setattr(f"rlhfkit.trainers.{module}.set_gradient_checkpointing", recording)
    return models


def _is_checkpointing(model) -> bool:
    return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def _same_weights(a_folder, b_folder, atol):
    a, b = load_file(a_folder / "model.safetensors"), load_file(b_folder / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_dpo_with_checkpointing_trains_the_same_weights(tmp_path, checkpointed):
    data = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(32, seed=5))
    common = dict(data=data, progress=False, max_steps=3, eval_every=0, save_every=0, eval_fraction=0.0,
                  learning_rate=3e-3, gradient_accumulation_steps=2, batch_size=4)
    run_dpo(tiny_config("dpo", output_dir=tmp_path / "plain", **common))
    assert checkpointed == []
    run_dpo(tiny_config("dpo", output_dir=tmp_path / "gc", gradient_checkpointing=True, **common))
    assert len(checkpointed) == 1 and _is_checkpointing(checkpointed[0])
    _same_weights(tmp_path / "plain", tmp_path / "gc", atol=1e-6)
    # and the runs did train: the weights moved from the start
    start = load_file(Path(resolve_model_path("tiny")) / "model.safetensors")
    trained = load_file(tmp_path / "gc" / "model.safetensors")
    assert any(not torch.equal(start[key], trained[key]) for key in start)


def test_ppo_with_checkpointing_under_bf16_trains_the_same_policy_and_critic(tmp_path, checkpointed):
    """PPO's backward runs with autocast paused; the recomputed forward must still run under bf16 autocast, as the
    first one did, or the gradients would differ by bf16 rounding."""
    reward = save_random_reward_model(tmp_path / "rm")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(8)])
    common = dict(data=prompts, reward_model=reward, progress=False, max_steps=2, rollout_batch_size=8,
                  mini_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, mixed_precision="bf16",
                  save_every=0, sample_every=0)
    run_ppo(tiny_config("ppo", output_dir=tmp_path / "plain", **common))
    run_ppo(tiny_config("ppo", output_dir=tmp_path / "gc", gradient_checkpointing=True, **common))
    assert len(checkpointed) == 2 and all(_is_checkpointing(m) for m in checkpointed)  # the policy and the critic
    for sub in ("", "critic"):
        _same_weights(tmp_path / "plain" / sub, tmp_path / "gc" / sub, atol=0)
