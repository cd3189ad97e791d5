"""Every trained stage with LoRA (`--lora-r`): adapter folders in peft's format, merged folders, one base in PPO,
learning through adapters, exact resume, and later stages that take an adapter folder as their model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.lora import lora_layers
from rlhfkit.runtime.metrics_log import read_metrics
from rlhfkit.trainers.dpo import run_dpo
from rlhfkit.trainers.grpo import run_grpo
from rlhfkit.trainers.ppo import PPO, run_ppo
from rlhfkit.trainers.ppo_models import load_ppo_models
from rlhfkit.trainers.reward import run_reward
from rlhfkit.trainers.sft import run_sft

from .helpers import keyword_pairs, tiny_config, write_jsonl
from .test_ppo import prompts, reward_folder  # noqa: F401 (fixtures)
from .test_resume import assert_crash_and_resume_is_exact

LORA = dict(lora_r=8, lora_alpha=16)


def keep_ppo_models(monkeypatch) -> dict:
    """After run_ppo, `seen["models"]` holds the run's PPOModels (to look at the roles it built)."""
    seen = {}
    real_init = PPO.__init__

    def spy(self, config):
        real_init(self, config)
        seen["models"] = self.models

    monkeypatch.setattr(PPO, "__init__", spy)
    return seen


def adapter_files(folder):
    return {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_sft_with_lora_writes_an_adapter_and_a_merged_model_that_agree(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f"A {i % 7}"} for i in range(24)])
    out = tmp_path / "sft"
    run_sft(tiny_config("sft", data=data, output_dir=out, max_steps=6, batch_size=4, learning_rate=1e-2,
                        progress=False, save_every=0, merge=True, **LORA))
    assert adapter_files(out) and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and "q_proj" in config["target_modules"]
    assert json.loads((out / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learned, through the adapter alone
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        from_adapter = load_causal_lm(out)(input_ids=ids).logits
        merged = load_causal_lm(out / "merged")(input_ids=ids).logits
        base = load_causal_lm("tiny")(input_ids=ids).logits
    torch.testing.assert_close(from_adapter, merged, rtol=0, atol=1e-4)
    assert (from_adapter - base).abs().max() > 1e-3  # the adapter moved the model


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_supervised_stages_with_lora_resume_exactly(tmp_path, monkeypatch, stage):
    run = {"sft": run_sft, "reward": run_reward, "dpo": run_dpo}[stage]
    rows = ([{"prompt": f"Q{i}", "completion": f"A {i % 7}"} for i in range(20)] if stage == "sft"
            else keyword_pairs(40, seed=5))
    common = dict(data=write_jsonl(tmp_path / "d.jsonl", rows), max_steps=6, save_every=2, eval_every=3,
                  batch_size=4, progress=False, keep_last_n=0, learning_rate=1e-3, **LORA)
    assert_crash_and_resume_is_exact(
        tmp_path, monkeypatch, run, lambda out, resume: tiny_config(stage, output_dir=out, resume=resume, **common),
        3, files=("adapter_model.safetensors",))
    if stage == "reward":  # the scalar head trains in full and travels with the adapter
        assert any("score" in k for k in load_file(tmp_path / "crashed" / "adapter_model.safetensors"))


def test_ppo_with_lora_holds_one_base_and_trains_only_the_adapters(tmp_path, reward_folder, prompts, monkeypatch,
                                                                   capsys):
    """The tiny model's logits are nearly uniform (random embeddings of std 0.02 behind a frozen final norm), so
    an adapter can barely sharpen them and a learning curve would say nothing; the role tests
    (tests/models/test_lora.py) show each role's gradients are a separate model's. Here: one base, frozen,
    the policy moving away from the reference through its adapter alone, and the folders written."""
    seen = keep_ppo_models(monkeypatch)
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=3, learning_rate=1e-2, save_every=0, sample_every=0, **LORA))
    # A full reward model cannot start a LoRA critic (critic_init: reward, the default): one line says so.
    assert "critic: a fresh adapter and value head on the policy's base" in capsys.readouterr().out
    models = seen["models"]
    # Policy, reference and critic are one base: the same tensors, not copies.
    base = models.policy.shared_base
    assert models.ref.shared_base is base and models.critic.shared_base is base and models.ref.adapter is None
    trained = {id(p) for p in models.policy.parameters()} | {id(p) for p in models.critic.parameters()}
    frozen = {k: p for k, p in base.named_parameters() if ".lora_" not in k}
    assert frozen and not any(id(p) in trained or p.requires_grad for p in frozen.values())
    fresh = dict(load_causal_lm("tiny").named_parameters())
    for key, param in frozen.items():  # the base is exactly the starting model after training
        assert torch.equal(param, fresh[key.replace(".base_layer", "")]), key
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: policy == ref
    # the sampled (k1) KL is 0 exactly while policy == reference; after an update it is not (either sign)
    assert rows[0]["ppo/approx_kl"] > 0 and all(abs(r["objective/kl"]) > 1e-4 for r in rows[1:])
    assert adapter_files(out) and adapter_files(out / "critic") and (out / "critic" / "value_head.safetensors").exists()
    assert any(load_file(out / "adapter_model.safetensors")[k].abs().max() > 0
               for k in load_file(out / "adapter_model.safetensors") if "lora_B" in k)
    # Evaluation and later stages take the adapter folder: merged into its base on load.
    assert not lora_layers(load_causal_lm(out))


def test_lora_ppo_under_bf16_keeps_its_base_in_bf16_and_starts_at_the_reference(tmp_path, reward_folder, prompts,
                                                                               monkeypatch):
    """Under bf16 autocast the one base of a LoRA PPO run is stored in bf16 (bitwise what autocast computes with:
    tests/models/test_lora.py); the adapters, the value head, embeddings and LM head stay fp32. The policy's
    adapter starts at zero, so the first iteration's KL to the reference (the same base, adapters off) is 0, and
    its one update sees a ratio of exactly 1 (nothing clipped)."""
    seen = keep_ppo_models(monkeypatch)
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=2, rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-2,
                        mixed_precision="bf16", save_every=0, sample_every=0, **LORA))
    base = seen["models"].policy.shared_base
    layer = base.model.layers[0].mlp.down_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert {layer.lora_A["policy"].weight.dtype, layer.lora_B["critic"].weight.dtype, base.lm_head.weight.dtype,
            seen["models"].critic.score.weight.dtype} == {torch.float32}
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["objective/kl"] == 0.0 and rows[0]["ppo/clipfrac"] == 0.0
    assert abs(rows[1]["objective/kl"]) > 0  # the policy's adapter moved it


def test_ppo_with_lora_resumes_exactly(tmp_path, monkeypatch, reward_folder, prompts):
    common = dict(data=prompts, reward_model=reward_folder, progress=False, max_steps=4, save_every=2,
                  sample_every=0, keep_last_n=0, learning_rate=1e-3, **LORA)
    assert_crash_and_resume_is_exact(
        tmp_path, monkeypatch, run_ppo, lambda out, resume: tiny_config("ppo", output_dir=out, resume=resume, **common),
        3, files=("adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/value_head.safetensors"))


def test_grpo_with_lora_uses_the_disabled_adapter_as_reference(tmp_path, reward_folder, prompts):
    out = tmp_path / "grpo"
    run_grpo(tiny_config("grpo", data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                         max_steps=2, prompts_per_step=4, num_generations=4, beta=0.04, save_every=0,
                         sample_every=0, learning_rate=1e-2, merge=True, **LORA))
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: policy == ref
    assert rows[-1]["objective/kl"] > 0  # after a step, the policy (adapter on) differs from the ref (off)
    assert adapter_files(out) and (out / "merged" / "model.safetensors").exists()


def test_a_lora_sft_folder_is_the_base_of_a_lora_ppo_run(tmp_path, reward_folder, prompts):
    """The reference must be the SFT weights: an SFT adapter is merged into the base before PPO's adapters."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f"A {i % 7}"} for i in range(16)])
    sft = tmp_path / "sft"
    run_sft(tiny_config("sft", data=data, output_dir=sft, max_steps=3, batch_size=4, learning_rate=1e-2,
                        progress=False, save_every=0, **LORA))
    out = tmp_path / "ppo"
    run_ppo(tiny_config("ppo", model=sft, data=prompts, reward_model=reward_folder, output_dir=out, progress=False,
                        max_steps=1, save_every=0, sample_every=0, **LORA))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft.resolve())
    assert read_metrics(out / "metrics.jsonl")[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():  # PPO's folder = SFT adapter merged, then PPO's adapter merged
        assert load_causal_lm(out)(input_ids=ids).logits.shape[-1] == load_causal_lm(sft).config.vocab_size


def test_the_lora_demo_chain_sft_then_reward_then_ppo_holds_one_base(tmp_path, prompts, monkeypatch):
    """`rlhfkit demo --preset lora`'s wiring: a LoRA reward model trained from the LoRA SFT folder starts from the
    SFT weights (its adapter merged into the scalar-head model's trunk), and PPO on that SFT folder then scores
    with it as a third adapter on the one base it holds."""
    from rlhfkit.models.reward_model import load_reward_model
    from rlhfkit.models.roles import Role

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f"A {i % 7}"} for i in range(16)])
    sft = tmp_path / "sft"
    run_sft(tiny_config("sft", data=data, output_dir=sft, max_steps=3, batch_size=4, learning_rate=1e-2,
                        progress=False, save_every=0, **LORA))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        trunk = load_reward_model(sft, pad_token_id=0).model(input_ids=ids).last_hidden_state
        merged = load_causal_lm(sft).model(input_ids=ids).last_hidden_state
        base = load_causal_lm("tiny").model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(trunk, merged, rtol=0, atol=1e-5)
    assert (merged - base).abs().max() > 1e-3  # the SFT adapter moved the trunk
    rm = tmp_path / "rm"
    run_reward(tiny_config("reward", model=sft, data=write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(24, seed=3)),
                           output_dir=rm, max_steps=2, batch_size=4, learning_rate=1e-2, progress=False,
                           save_every=0, **LORA))
    seen = keep_ppo_models(monkeypatch)
    run_ppo(tiny_config("ppo", model=sft, data=prompts, reward_model=rm, output_dir=tmp_path / "ppo", progress=False,
                        max_steps=1, save_every=0, sample_every=0, **LORA))
    models = seen["models"]
    assert isinstance(models.reward.model, Role) and models.reward.model.shared_base is models.policy.shared_base
    # The critic started as the reward model (critic_init: reward): its adapter and head are the reward's, and
    # they train while the reward's stay frozen.
    fresh = load_ppo_models(tiny_config("ppo", model=sft, data=prompts, reward_model=rm, device="cpu", **LORA))
    layers = lora_layers(fresh.policy.shared_base)
    for layer in layers:
        for kind in ("lora_A", "lora_B"):
            critic, reward = getattr(layer, kind)["critic"].weight, getattr(layer, kind)["reward"].weight
            assert torch.equal(critic, reward) and critic.requires_grad and not reward.requires_grad
    assert torch.equal(fresh.critic.score.weight, fresh.reward.model.score.weight)
    assert any(getattr(layer, "lora_B")["reward"].weight.abs().max() > 0 for layer in layers)  # trained, not zero


def test_a_lora_reward_model_on_the_same_base_scores_as_a_third_adapter(tmp_path, prompts, monkeypatch):
    from rlhfkit.models.reward_model import load_reward_model, score_sequences
    from rlhfkit.models.roles import Role

    rm = tmp_path / "rm"
    run_reward(tiny_config("reward", data=write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(24, seed=3)),
                           output_dir=rm, max_steps=3, batch_size=4, learning_rate=1e-2, progress=False,
                           save_every=0, **LORA))
    seen = keep_ppo_models(monkeypatch)
    run_ppo(tiny_config("ppo", data=prompts, reward_model=rm, output_dir=tmp_path / "ppo", progress=False,
                        max_steps=1, save_every=0, sample_every=0, **LORA))
    models = seen["models"]
    scorer = models.reward.model
    assert isinstance(scorer, Role) and scorer.shared_base is models.policy.shared_base and scorer.adapter == "reward"
    assert not any(p.requires_grad for p in scorer.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = (ids != 0).long()
    alone = load_reward_model(rm, models.tokenizer.pad_token_id)  # the reward model on its own, merged
    with torch.no_grad():
        torch.testing.assert_close(score_sequences(scorer, ids, mask), score_sequences(alone, ids, mask),
                                   rtol=0, atol=1e-4)
