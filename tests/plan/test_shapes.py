"""Model shapes: parameter counts from the shape agree with real models (tiny, embedded, and the named shapes
built by transformers on the meta device, which allocates nothing)."""

import json

import pytest
import torch

from rlhfkit.errors import UserError
from rlhfkit.plan.shapes import KNOWN, resolve_shape, shape_from_config, tiny_shape


def test_tiny_shape_counts_the_tiny_models_parameters(tiny_model):
    shape = tiny_shape()
    assert shape.params == sum(p.numel() for p in tiny_model.parameters())
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.tied) == (2, 64, 4, 2, True)


def test_embedded_shape_is_smollm2_135m_and_counts_its_parameters():
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfkit.models.embedded import embedded_dir

    shape = resolve_shape("embedded")
    assert shape.params == 134_515_008
    folder = embedded_dir()
    if not (folder / "config.json").is_file():
        pytest.skip("the embedded model is not converted in this cache")
    assert resolve_shape(str(folder)).params == shape.params  # read from its config.json
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    assert sum(p.numel() for p in model.parameters()) == shape.params


def _hf_config(shape):
    from transformers import AutoConfig

    kw = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
              num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
              tie_word_embeddings=shape.tied)
    if shape.family == "phi":
        return AutoConfig.for_model("phi", **kw)
    return AutoConfig.for_model("qwen2" if shape.qkv_bias else "llama", head_dim=shape.head_dim, **kw)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_named_shapes_count_what_transformers_builds(name):
    from transformers import AutoModelForCausalLM

    shape = KNOWN[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(shape))
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_published_parameter_counts():
    # the numbers on the models' pages
    assert KNOWN["phi-2"].params == 2_779_683_840
    assert KNOWN["Llama-3.1-8B"].params == 8_030_261_248
    assert KNOWN["Qwen2.5-0.5B"].params == 494_032_768


def test_lora_parameters_match_peft(tiny_model):
    from peft import LoraConfig, inject_adapter_in_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = inject_adapter_in_model(LoraConfig(r=8, target_modules=targets), tiny_model)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert tiny_shape().lora_params(8) == adapters
    assert tiny_shape().lora_params(8, ("q_proj", "v_proj")) == 2 * 8 * (64 + 64 + 64 + 32)


def test_shape_from_a_config_json_folder(tmp_path):
    cfg = {"model_type": "mistral", "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3,
           "vocab_size": 1000, "intermediate_size": 256, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = resolve_shape(str(tmp_path))
    assert (shape.head_dim, shape.kv_heads, shape.tied, shape.note) == (32, 2, True, "")
    odd = shape_from_config({**cfg, "model_type": "gpt_neox"}, "x")
    assert "Llama-style" in odd.note


def test_aliases_and_unknown_names():
    assert resolve_shape("microsoft/phi-2") is KNOWN["phi-2"]
    assert resolve_shape("qwen2.5-7b") is KNOWN["Qwen2.5-7B"]
    with pytest.raises(UserError, match="not a known shape"):
        resolve_shape("gpt-5")
