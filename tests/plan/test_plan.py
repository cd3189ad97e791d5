"""Plans: placement, layouts, phases, suggestions that really fit when re-planned, and the command's text and JSON."""

import json
from dataclasses import replace

import pytest

from rlhfkit.cli import main
from rlhfkit.config_parsing import build_config
from rlhfkit.plan import build_workload, parse_devices, plan, suggest
from rlhfkit.plan.shapes import KNOWN
from rlhfkit.plan.workload import knobs_from_config

GIB = 2**30


def workload(stage="ppo", preset="demo", **overrides):
    config = build_config(stage, preset=preset, overrides={k: str(v) for k, v in overrides.items()})
    return build_workload(stage, config)


def test_phi2_ppo_on_five_t4s_in_full_does_not_fit_and_the_suggestions_do():
    wl, devices = workload(model="phi-2"), parse_devices("5xT4")
    p = plan(wl, devices)
    assert not p.fits and p.peak(0).phase == "train"
    # four phi-2 models, two of them trained with AdamW: 4 x 11.1 GB of weights alone exceed a T4
    assert p.peak(0).parts["weights"] > 4 * KNOWN["phi-2"].params * 4 * 0.7
    suggestions = suggest(wl, devices)
    assert suggestions
    for s in suggestions:
        assert s.plan.fits and s.changes
        # the suggested settings, planned again from scratch, fit too
        assert plan(s.plan.workload, devices).fits


def test_suggestions_are_minimal_and_cheapest_first():
    # 16 x 256 tokens of activations and full logits do not fit beside the 2 GB of weights, gradients and AdamW
    # state: a smaller micro-batch alone fixes it, and the largest that fits is the one suggested
    wl, devices = workload("sft", "tiny", model="SmolLM2-135M", batch_size=16, max_length=256), parse_devices("cpu:4GB")
    assert not plan(wl, devices).fits
    suggestions = suggest(wl, devices)
    first = suggestions[0]
    micro = first.plan.workload.knobs.micro_batch
    assert first.changes == [f"batch_size: {micro}, gradient_accumulation_steps: {16 // micro} (same 16 per "
                             f"optimizer step)"]
    assert first.plan.fits
    twice = replace(wl, knobs=replace(wl.knobs, micro_batch=2 * micro), accumulation=16 // (2 * micro))
    assert not plan(twice, devices).fits
    assert [s.cost for s in suggestions] == sorted(s.cost for s in suggestions)
    for s in suggestions[1:]:  # no later suggestion contains an earlier one
        assert not set(first.changes) <= set(s.changes)


def test_checkpointing_and_lora_lower_what_they_should():
    base = workload("sft", "tiny", model="SmolLM2-360M", batch_size=8, max_length=256)
    cpu = parse_devices("cpu:512GB")
    full = plan(base, cpu)
    gc = plan(replace(base, knobs=replace(base.knobs, gradient_checkpointing=True)), cpu)
    acts = full.activations["policy"]
    assert gc.activations["policy"]["saved"] == acts["checkpointed"] < acts["saved"] / 5
    lora = build_workload("sft", build_config("sft", preset="tiny", overrides={
        "model": "SmolLM2-360M", "batch_size": "8", "max_length": "256", "lora_r": "16"}))
    lp = plan(lora, cpu).peak(0).parts
    assert lp["optimizer"] < full.peak(0).parts["optimizer"] / 20  # only the adapters have AdamW state
    assert lp["gradients"] < full.phases["train"][0].parts["weights"] / 20


def test_layouts_place_models():
    wl, devices = workload(model="phi-2"), parse_devices("5xT4")
    spread = plan(replace(wl, knobs=replace(wl.knobs, layout="spread")), devices)
    assert sorted(i for ids in spread.placement.values() for i in ids) == [0, 1, 2, 3]
    fsdp = plan(replace(wl, knobs=replace(wl.knobs, layout="fsdp")), devices)
    single = plan(wl, devices)
    assert all(ids == [0, 1, 2, 3, 4] for ids in fsdp.placement.values())
    # FSDP shards the trained policy and critic over the 5 devices; the frozen reference and reward model stay
    # whole on each (as rlhfkit runs it)
    trained = plan(replace(wl, weights=[w for w in wl.weights if w.trained != "frozen"]), devices)
    frozen = single.phases["train"][0].parts["weights"] - trained.phases["train"][0].parts["weights"]
    assert frozen > 0 and {w.trained for w in wl.weights} == {"full", "frozen"}
    per_device = fsdp.phases["train"][0].parts["weights"]
    assert per_device == pytest.approx(trained.phases["train"][0].parts["weights"] / 5 + frozen, rel=1e-6)


def test_fsdp_frozen_shard_shards_the_reference_and_reward_model_and_is_suggested_when_it_fits():
    """`fsdp_frozen: shard`: every device holds 1/N of the frozen models too, outside the rollout; each frozen model
    is gathered whole only for its own scoring pass, with the trained ones sharded again. Qwen2.5-0.5B PPO on
    4 x 8 GB under FSDP does not fit with the frozen models whole on each device and fits with them sharded: that
    is the first suggestion."""
    from rlhfkit.plan.layout import is_sharded, weight_bytes

    wl, devices = workload(model="Qwen2.5-0.5B"), parse_devices("4xgpu:8GB")
    wl = replace(wl, knobs=replace(wl.knobs, layout="fsdp"))
    whole, sharded = plan(wl, devices), plan(replace(wl, knobs=replace(wl.knobs, shard_frozen=True)), devices)
    trained = [w for w in wl.weights if w.trained != "frozen"]
    frozen = [w for w in wl.weights if w.trained == "frozen"]
    assert [w.name for w in frozen] == ["reference", "reward model"]
    one = {w.name: weight_bytes(w, wl, devices[0]) for w in wl.weights}  # each model's weights, whole
    assert whole.phases["train"][0].parts["weights"] == pytest.approx(
        sum(one[w.name] for w in trained) / 4 + sum(one[w.name] for w in frozen), rel=1e-6)
    assert sharded.phases["train"][0].parts["weights"] == pytest.approx(sum(one.values()) / 4, rel=1e-6)
    # the score phase's worst moment gathers one side whole: never more than every model whole at once
    gathered = sharded.peak(0) if sharded.peak(0).phase == "score" else sharded.phases["score"][0]
    assert gathered.parts["weights"] + gathered.parts["other"] < sum(one.values())
    assert not whole.fits and sharded.fits
    first = suggest(wl, devices)[0]
    assert first.changes == ["fsdp_frozen: shard (the reference and reward model sharded too, gathered whole only "
                             "to score)"] and first.plan.workload.knobs.shard_frozen
    # DPO's reference runs inside the loss and stays whole; so does everything outside the fsdp layout
    dpo = workload("dpo", "tiny", model="Qwen2.5-0.5B")
    dpo = replace(dpo, knobs=replace(dpo.knobs, layout="fsdp", shard_frozen=True))
    assert not is_sharded(dpo.role("reference"), dpo)
    assert not is_sharded(wl.role("reference"), replace(wl, knobs=replace(wl.knobs, layout="single",
                                                                           shard_frozen=True)))


def test_lora_ppo_keeps_one_base_for_three_roles():
    wl = workload(model="phi-2", lora_r=16)
    base = wl.role("policy")
    assert base is wl.role("reference") is wl.role("critic") and base.trained == "lora"
    assert wl.role("reward model") is not base and len(wl.weights) == 2


def test_a_lora_base_is_planned_with_bf16_linears_under_bf16_unless_fsdp_shards_it():
    """As models/precision.store_lora_base_in_bf16 stores it: the blocks' linear layers in 2 bytes under bf16
    (an A100), all of it fp32 in fp32 (a CPU) and under FSDP; the adapters fp32 either way."""
    from rlhfkit.plan import memory as mem
    from rlhfkit.plan.layout import trainable_params, weight_bytes

    wl, a100, cpu = workload(lora_r=16), parse_devices("1xA100-80GB")[0], parse_devices("cpu:24GB")[0]
    base = wl.role("policy")
    adapters = trainable_params(base, wl) * 4
    full = mem.weight_bytes(base.shape, True, 4)
    assert weight_bytes(base, wl, cpu) == full + adapters
    assert weight_bytes(base, wl, a100) == full - mem.block_linear_params(base.shape) * 2 + adapters
    sharded = replace(wl, knobs=replace(wl.knobs, layout="fsdp"))
    assert weight_bytes(base, sharded, a100) == full + adapters


def test_grpo_without_beta_loads_no_reference():
    config = build_config("grpo", preset="tiny", overrides={"reward_function": "m:f"})
    wl = build_workload("grpo", config)
    assert wl.role("reference") is None and wl.role("reward model") is None
    assert [w.name for w in wl.weights] == ["policy"]


def test_command_text_and_json(capsys):
    assert main(["plan", "--preset", "demo", "--stage", "ppo", "--model", "phi-2", "--devices", "5xT4"]) == 0
    text = capsys.readouterr().out
    for words in ("where each model goes", "kv cache", "optimizer", "activations", "logits", "DOES NOT FIT",
                  "smallest changes", "layout fsdp"):
        assert words in text
    assert main(["plan", "--preset", "demo", "--stage", "ppo", "--model", "phi-2", "--devices", "5xT4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == "ppo" and out["fits"] is False and len(out["devices"]) == 5
    assert set(out["devices"][0]["phases"]) == {"generate", "score", "train"}
    kinds = {"weights", "gradients", "optimizer", "activations", "logits", "kv cache"}
    assert kinds <= set(out["devices"][0]["peak_parts"])
    assert out["suggestions"] and all(s["fits"] for s in out["suggestions"])
    assert {m["name"] for m in out["models"]} == {"policy", "reference", "critic", "reward model"}


def test_command_plans_every_training_stage_of_a_pipeline(tmp_path, capsys):
    path = tmp_path / "pipe.yaml"
    path.write_text("model: tiny\nstages: [sft, annotate, reward, ppo, eval]\nppo: {rollout_batch_size: 8}\n")
    assert main(["plan", "--config", str(path), "--devices", "cpu:16GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"sft", "reward", "ppo"} and all(v["fits"] for v in out.values())


def test_command_mistakes(capsys):
    assert main(["plan", "--preset", "tiny", "--devices", "cpu:8GB"]) == 2
    assert "--stage" in capsys.readouterr().err
    assert main(["plan", "--preset", "tiny", "--stage", "ppo", "--devices", "cpu:8GB", "--layout", "ring"]) == 2
    assert "single, spread, fsdp" in capsys.readouterr().err
    assert main(["plan", "--preset", "tiny", "--stage", "sft", "--devices", "cpu:8GB", "--model", "gpt-5"]) == 2
    assert "not a known shape" in capsys.readouterr().err
    assert main(["plan", "--help"]) == 0
    assert "--devices LIST" in capsys.readouterr().out


def test_knobs_read_the_config():
    config = build_config("ppo", preset="tiny", overrides={"lora_r": "8", "gradient_checkpointing": "true",
                                                           "lora_target_modules": "q_proj,v_proj"})
    k = knobs_from_config("ppo", config)
    assert (k.lora_r, k.gradient_checkpointing, k.lora_targets, k.micro_batch) == (8, True, ("q_proj", "v_proj"), 4)
    assert not k.shard_frozen
    config = build_config("grpo", preset="tiny", overrides={"fsdp_frozen": "shard", "reward_function": "m:f"})
    assert knobs_from_config("grpo", config).shard_frozen
