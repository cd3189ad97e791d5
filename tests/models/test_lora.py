"""LoRA on one base: each role (policy, reference, critic) gives the outputs and gradients of a separately loaded
model with the same weights; adapter folders load in peft and in every stage."""

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.models import lora
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.reward_model import load_reward_model
from rlhfkit.models.roles import Role
from rlhfkit.models.trained import load_trained_weights, save_trained
from rlhfkit.rollout.scoring import tail_logprobs

from tests.tolerances import close

# The reductions a tiny-model forward goes through (hidden and MLP width per layer, the vocabulary): the
# tolerance of comparing two computations of the same function (tests/tolerances.py).
_TINY = load_causal_lm("tiny").config
SIZES = [_TINY.hidden_size, _TINY.intermediate_size] * _TINY.num_hidden_layers + [_TINY.vocab_size]
SETTINGS = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules="all-linear")


def randomise_adapter(model, name, seed):
    """A new adapter's B is zero (it changes nothing); give every A and B random values so roles differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def shared_base():
    base = load_causal_lm("tiny")
    for seed, name in enumerate(("policy", "critic")):
        lora.add_adapter(base, lora.lora_config(SETTINGS), name)
        randomise_adapter(base, name, seed)
    head = torch.nn.Linear(base.config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=0.5)
    return base, Role(base, "policy"), Role(base, None), Role(base, "critic", score=head)


def alone(base, name):
    """A separately loaded model with only adapter `name`'s weights (same values), peft's own switching."""
    other = load_causal_lm("tiny")
    lora.add_adapter(other, lora.lora_config(SETTINGS), name)
    other.load_state_dict({k: v for k, v in base.state_dict().items() if f".{name}." in k}, strict=False)
    return other


def batch(seed=0, B=3, P=5, R=4):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (B, P + R), generator=gen)
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions, ids[:, P:]


def test_only_adapters_train_and_a_new_adapter_changes_nothing():
    base = load_causal_lm("tiny")
    before = base(input_ids=torch.tensor([[5, 6, 7]])).logits
    lora.add_adapter(base, lora.lora_config(SETTINGS), "policy")
    trainable = [k for k, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.policy." in k or ".lora_B.policy." in k for k in trainable)
    # B starts at zero: the adapted model is the base, to the bit.
    assert torch.equal(base(input_ids=torch.tensor([[5, 6, 7]])).logits, before)
    # 7 linear layers per block get adapters, the LM head does not.
    targets = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in trainable if ".lora_A." in k}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_each_role_equals_a_separate_model_in_outputs_and_gradients():
    base, policy, ref, critic = shared_base()
    ids, mask, positions, labels = batch()
    plain = load_causal_lm("tiny")
    # Reference = adapters off = the base model exactly.
    with torch.no_grad():
        got = tail_logprobs(ref, ids, mask, positions, labels)[0]
        want = tail_logprobs(plain, ids, mask, positions, labels)[0]
    assert torch.equal(got, want)
    # Policy: interleave the critic's forward between the policy's forward and backward, as PPO's update does.
    logp = tail_logprobs(policy, ids, mask, positions, labels)[0]
    hidden = critic.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    values = critic.score(hidden).squeeze(-1)  # (B, T)
    logp.sum().backward()
    values.sum().backward()
    only_policy = alone(base, "policy")
    want_logp = tail_logprobs(only_policy, ids, mask, positions, labels)[0]
    want_logp.sum().backward()
    close(logp, want_logp, *SIZES)
    own = dict(policy.named_parameters())
    for key, param in only_policy.named_parameters():
        if param.requires_grad:
            assert torch.allclose(own[key].grad, param.grad, rtol=1e-5, atol=1e-7), key
    # The critic's gradients: its adapter and head only, equal to a separate trunk with the critic adapter.
    only_critic = alone(base, "critic")
    head = torch.nn.Linear(base.config.hidden_size, 1, bias=False)
    head.load_state_dict(critic.score.state_dict())
    want_values = head(only_critic.base_model(input_ids=ids, attention_mask=mask,
                                              position_ids=positions).last_hidden_state).squeeze(-1)
    want_values.sum().backward()
    close(values, want_values, *SIZES)
    theirs = dict(only_critic.named_parameters())
    for key, param in critic.named_parameters():
        if key.startswith("score."):
            assert torch.allclose(param.grad, head.weight.grad, rtol=1e-5, atol=1e-7)
        else:
            assert torch.allclose(param.grad, theirs[key].grad, rtol=1e-5, atol=1e-7), key
    # No leak: the roles' parameter sets are disjoint, and nothing of the base got a gradient.
    assert not set(map(id, policy.parameters())) & set(map(id, critic.parameters()))
    assert all(p.grad is None for k, p in base.named_parameters() if ".lora_" not in k)
    # And after all that switching, the base is back on the path it had.
    assert lora.active_adapter(base) == "policy" and not lora.lora_layers(base)[0]._disable_adapters


def test_adapter_folder_loads_in_peft_and_as_a_merged_model(tmp_path):
    from peft import PeftModel

    base, policy, _, critic = shared_base()
    tokenizer = load_tokenizer("tiny")
    save_trained(policy, tokenizer, tmp_path / "policy", base="tiny")
    save_trained(critic, tokenizer, tmp_path / "critic", base="tiny")
    assert {p.name for p in (tmp_path / "policy").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(load_causal_lm("tiny"), str(tmp_path / "policy"))
        close(peft_model(input_ids=ids).logits, want, *SIZES)
        # Every stage loads either folder kind: an adapter folder is merged into its base on load.
        merged = load_causal_lm(tmp_path / "policy")
        assert type(merged).__name__ == "LlamaForCausalLM" and not lora.lora_layers(merged)
        close(merged(input_ids=ids).logits, want, *SIZES)
    # A resumed run reads the adapter (and the critic's value head) back into its roles exactly.
    _, policy2, _, critic2 = shared_base()
    with torch.no_grad():
        for p in list(policy2.parameters()) + list(critic2.parameters()):
            p.zero_()
    load_trained_weights(policy2, tmp_path / "policy")
    load_trained_weights(critic2, tmp_path / "critic")
    for a, b in zip(list(policy.parameters()) + list(critic.parameters()),
                    list(policy2.parameters()) + list(critic2.parameters())):
        assert torch.equal(a, b)


def test_reward_model_with_lora_saves_its_head_and_merges(tmp_path):
    tokenizer = load_tokenizer("tiny")
    rm = load_reward_model("tiny", tokenizer.pad_token_id)
    lora.add_adapter(rm, lora.lora_config(SETTINGS, score_head=True), "default")
    randomise_adapter(rm, "default", 3)
    trainable = {k for k, p in rm.named_parameters() if p.requires_grad}
    assert any(k.startswith("score.") for k in trainable)  # the head trains in full
    save_trained(rm, tokenizer, tmp_path / "rm", base="tiny")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    from rlhfkit.models.reward_model import score_sequences

    with torch.no_grad():
        want = score_sequences(rm, ids, mask)
        got = score_sequences(load_reward_model(tmp_path / "rm", tokenizer.pad_token_id), ids, mask)
    close(got, want, *SIZES)


def test_a_broken_adapter_folder_is_one_clear_error(tmp_path):
    from rlhfkit.errors import UserError

    base, policy, _, _ = shared_base()
    save_trained(policy, load_tokenizer("tiny"), tmp_path / "a", base="tiny")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot apply the LoRA adapter"):
        load_causal_lm(tmp_path / "a")


def test_a_base_stored_in_bf16_gives_bitwise_the_same_roles_under_autocast():
    """Under bf16 autocast a frozen fp32 weight is rounded to bf16 at every forward; storing the base layers in
    bf16 once (models.precision.store_lora_base_in_bf16, which with_lora applies under bf16) rounds them the same
    way, so every role's outputs and the adapters' gradients are bit for bit those of the fp32-stored base."""
    import copy

    from rlhfkit.models.precision import store_lora_base_in_bf16

    kept, *roles_kept = shared_base()
    stored = copy.deepcopy(kept)
    store_lora_base_in_bf16(stored)
    q_proj = stored.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16 and q_proj.lora_A["policy"].weight.dtype == torch.float32
    assert stored.get_input_embeddings().weight.dtype == torch.float32 == stored.lm_head.weight.dtype
    roles_stored = [Role(stored, "policy"), Role(stored, None), Role(stored, "critic", score=roles_kept[2].score)]
    ids, mask, positions, _ = batch()
    for base, roles in ((kept, roles_kept), (stored, roles_stored)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = [roles[0](input_ids=ids, attention_mask=mask, position_ids=positions).logits,
                       roles[1](input_ids=ids, attention_mask=mask, position_ids=positions).logits,
                       roles[2](input_ids=ids, attention_mask=mask, position_ids=positions).logits]
        sum(o.float().square().mean() for o in outputs).backward()
        base.outputs = outputs
    for a, b in zip(kept.outputs, stored.outputs):
        assert torch.equal(a, b)
    grads = {k: p.grad for k, p in kept.named_parameters() if p.grad is not None}
    assert len(grads) > 0 and grads.keys() == {k for k, p in stored.named_parameters() if p.grad is not None}
    for key, param in stored.named_parameters():
        if key in grads:
            assert torch.equal(param.grad, grads[key]), key


def test_sampling_merges_the_role_adapter_for_the_rollout_and_puts_the_same_weights_back():
    """A LoRA role samples as one plain model: W + (alpha/r) B A in each layer, adapters off. Its logits are the
    role's own (the same function, other rounding), its samples those of a model merged by peft, and afterwards
    every weight of the base is the very tensor it was, with the same values, and the routing is as before."""
    from rlhfkit.rollout.generate import sample_responses

    base, policy, ref, critic = shared_base()
    ids, mask, positions, _ = batch()
    weights = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in base.named_parameters()}
    with torch.no_grad():
        want = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with policy.merged() as sampler:
            assert lora.lora_layers(base)[0]._disable_adapters  # the adapter's path is off: merged into W
            got = sampler(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            moved = [n for n, (p, ptr, _) in weights.items() if p.data_ptr() != ptr]
            assert moved and all(n.endswith("base_layer.weight") for n in moved)
        assert not torch.equal(got, ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits)
    close(got, want, *SIZES)
    for name, (param, ptr, value) in weights.items():
        assert param.data_ptr() == ptr and torch.equal(param, value), name
    assert lora.active_adapter(base) == "policy" and not lora.lora_layers(base)[0]._disable_adapters

    tokenizer = load_tokenizer("tiny")
    prompts = [[5, 17, 42, 9], [7, 8], [100, 3, 64]]
    seeds = [11, 22, 33]
    ours = sample_responses(policy, tokenizer, prompts, 6, seeds=seeds)
    merged = alone(base, "policy")  # peft's own merge of each layer (inject_adapter_in_model keeps the class)
    for layer in lora.lora_layers(merged):
        layer.merge(adapter_names=["policy"])
    theirs = sample_responses(merged, tokenizer, prompts, 6, seeds=seeds)
    assert [s.response_ids for s in ours] == [s.response_ids for s in theirs]
    for name, (param, ptr, value) in weights.items():
        assert param.data_ptr() == ptr and torch.equal(param, value), name


def test_a_bf16_base_is_not_merged_for_sampling_since_the_adapter_would_round_away():
    """In a bf16 weight W + delta rounds back to W wherever the delta is under half an ulp: merging would sample
    from a policy pulled towards the base. So a role on a bf16 base samples through its adapter, weights untouched."""
    from rlhfkit.models.precision import store_lora_base_in_bf16

    base, policy, _, _ = shared_base()
    store_lora_base_in_bf16(base)
    layer = lora.lora_layers(base)[0]
    weight = layer.get_base_layer().weight
    small = layer.get_delta_weight("policy").float() * 1e-3  # a delta of an early update: under bf16's half ulp
    lost = ((weight.float() + small).to(torch.bfloat16) == weight).float().mean()
    assert lost > 0.8  # the rounding the test is about: most of such a delta vanishes in a bf16 weight
    ptrs = [p.data_ptr() for p in base.parameters()]
    with policy.merged() as sampler:
        assert [p.data_ptr() for p in base.parameters()] == ptrs
        assert lora.active_adapter(base) == "policy" and not layer._disable_adapters
        assert sampler.adapter == "policy"
