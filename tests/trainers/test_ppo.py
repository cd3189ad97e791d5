"""PPO end to end on the tiny model: outputs, metrics, learning, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.ppo import run_ppo

from .helpers import save_random_reward_model, tiny_config, write_jsonl
from .test_resume import assert_crash_and_resume_is_exact, comparable

REQUIRED = ("objective/kl", "objective/rlhf_reward", "objective/scores", "ppo/approx_kl", "ppo/clipfrac",
            "ppo/explained_variance", "ppo/entropy", "loss/policy", "loss/value", "response/length_mean",
            "time/rollout_s", "time/score_s", "time/train_s", "objective/kl_coef")


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """A tiny reward model with a random head: PPO must learn to please it."""
    return save_random_reward_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture()
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(16)])


def test_ppo_writes_policy_critic_metrics_and_samples(tmp_path, reward_folder, prompts):
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=3, save_every=2, sample_every=2, gold_scorer="vader"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in REQUIRED + ("objective/gold",):
        assert key in rows[-1], key
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert all(0 <= r["ppo/clipfrac"] <= 1 for r in rows)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "critic" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("response" in s and "score" in s for s in samples)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_ppo_raises_the_reward_model_score(tmp_path, reward_folder):
    """The policy learns to please a (random) reward model. Batch means are noisy (std about 1.4 over 32
    samples), so the test compares the first 5 iterations with the last 10 of 30: over seeds 0-3 they moved
    from 0.3 to 5.2 on average, and the smallest rise was 4.2."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(32)])
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=30, rollout_batch_size=32, mini_batch_size=16, ppo_epochs=2, learning_rate=1e-2,
                        critic_learning_rate=1e-3, kl_coef=0.0, save_every=0, sample_every=0))
    scores = [r["objective/scores"] for r in read_metrics(out / "metrics.jsonl")]
    assert sum(scores[-10:]) / 10 > sum(scores[:5]) / 5 + 2.0, scores


@pytest.mark.parametrize("crash_step", [2, 3])
def test_ppo_resume_after_a_crash_is_exact(tmp_path, monkeypatch, reward_folder, prompts, crash_step):
    common = dict(data=prompts, reward_model=reward_folder, progress=False, max_steps=4, save_every=2,
                  sample_every=0, keep_last_n=0, adaptive_kl=True, kl_target=0.1, kl_horizon=100)
    # The metrics compared include the adapted objective/kl_coef.
    rows = assert_crash_and_resume_is_exact(
        tmp_path, monkeypatch, run_ppo, lambda out, resume: tiny_config("ppo", output_dir=out, resume=resume, **common),
        crash_step, files=("model.safetensors", "critic/model.safetensors"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_first_update_sees_ratio_one_under_bf16(tmp_path, reward_folder, prompts):
    """Before any update the new log-probs equal the rollout's, even in bf16 with other micro-batches:
    nothing is clipped and the approximate KL is ~0 (the LM head runs in fp32 for this)."""
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=1, rollout_batch_size=8, mini_batch_size=8, gradient_accumulation_steps=4,
                        ppo_epochs=1, mixed_precision="bf16", save_every=0, sample_every=0))
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["ppo/clipfrac"] == 0.0
    assert row["ppo/approx_kl"] < 1e-4
    assert abs(row["ppo/ratio_mean"] - 1.0) < 1e-2


def test_every_update_forward_sees_the_current_weights_under_bf16(tmp_path, monkeypatch, reward_folder, prompts):
    """bf16 autocast caches the cast of each weight until its context exits. A context around the whole
    update would make the forwards after the first optimizer step use the weights from before it (a bug
    this test caught once): each training forward must equal a fresh forward of a copy of the weights."""
    import copy

    import rlhfkit.trainers.ppo as ppo_module
    from rlhfkit.runtime.precision import autocast
    from rlhfkit.rollout.scoring import response_logprobs

    seen = []

    def recording(model, sub, *args, **kwargs):
        logprobs, entropy = response_logprobs(model, sub, *args, **kwargs)
        if model.training:
            seen.append((copy.deepcopy(model).eval(), sub, logprobs.detach().clone()))
        return logprobs, entropy

    monkeypatch.setattr(ppo_module, "response_logprobs", recording)
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=tmp_path / "ppo", progress=False,
                        max_steps=1, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-2,
                        mixed_precision="bf16", save_every=0, sample_every=0))
    assert len(seen) == 4  # 2 epochs x 2 mini-batches, one micro-batch each
    for model, sub, logprobs in seen:
        with torch.no_grad(), autocast("bf16"):
            fresh = response_logprobs(model, sub)[0]
        assert torch.equal(fresh, logprobs)
    assert not torch.equal(seen[0][0].model.embed_tokens.weight, seen[-1][0].model.embed_tokens.weight)


def test_old_logprobs_from_sampling_match_scoring_in_fp32(tmp_path, reward_folder, prompts):
    """With logprobs_from_sampling the policy is not scored again: in fp32 the sampling pass's log-probs
    equal a full forward's to ~1e-6, so the first update still sees a ratio of 1 and the KL to the
    (identical) reference is ~0."""
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=2, rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1,
                        logprobs_from_sampling=True, save_every=0, sample_every=0))
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["ppo/clipfrac"] == 0.0 and first["ppo/approx_kl"] < 1e-8
    assert abs(first["objective/kl"]) < 1e-4


def test_ppo_sigterm_writes_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, reward_folder, prompts):
    import signal

    from rlhfkit.runtime.interrupt import TrainingStopped

    from .test_resume import signal_after_logging

    common = dict(data=prompts, reward_model=reward_folder, progress=False, max_steps=3, save_every=0,
                  sample_every=0, keep_last_n=0)
    run_ppo(tiny_config("ppo", output_dir=tmp_path / "straight", **common))
    with monkeypatch.context() as patch:
        signal_after_logging(patch, 2, signal.SIGTERM)
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 2") as info:
            run_ppo(tiny_config("ppo", output_dir=tmp_path / "stopped", **common))
    assert info.value.exit_code == 143
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["step-2"]
    run_ppo(tiny_config("ppo", output_dir=tmp_path / "stopped", resume=True, **common))
    for part in ("model.safetensors", "critic/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / part), load_file(tmp_path / "stopped" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3] and comparable(a) == comparable(b)


def test_ppo_skips_non_finite_updates_and_stops_after_max_bad_steps(tmp_path, monkeypatch, reward_folder, prompts):
    import rlhfkit.trainers.ppo as ppo_module
    from rlhfkit.errors import UserError

    real, calls = ppo_module.ppo_policy_loss, [0]
    bad = set()

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan"), metrics) if calls[0] in bad else (loss, metrics)

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", poisoned)
    # tiny preset: rollout 8, mini 4, 2 epochs -> 4 mini-batches (one micro-batch each) per iteration
    common = dict(data=prompts, reward_model=reward_folder, progress=False, sample_every=0, keep_last_n=0,
                  max_bad_steps=3)
    bad.update({2})
    run_ppo(tiny_config("ppo", output_dir=tmp_path / "one", max_steps=2, save_every=0, **common))
    rows = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [1, 1]
    calls[0] = 0
    bad.clear()
    bad.update(range(5, 100))  # every mini-batch from iteration 2 on
    # checked after each iteration: all 4 mini-batches of iteration 2 were skipped (>= 3)
    with pytest.raises(UserError, match=r"iteration 2: 4 mini-batches in a row had a non-finite gradient"):
        run_ppo(tiny_config("ppo", output_dir=tmp_path / "many", max_steps=4, save_every=1, **common))
    assert sorted(p.name for p in (tmp_path / "many" / "checkpoints").iterdir()) == ["step-1"]
    weights = load_file(tmp_path / "many" / "checkpoints" / "step-1" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
