"""The embedded SmolLM2-135M-Instruct: converted once from the PyPI wheel's GGUF, then a plain HF folder."""

import json

import torch

from rlhfkit.models.embedded import embedded_dir, ensure_embedded


def test_embedded_folder_is_a_plain_safetensors_hf_folder():
    folder = ensure_embedded()
    assert folder == embedded_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 400_000_000  # fp32, ~135M parameters
    assert not list(folder.glob("*.gguf"))


def test_embedded_chat_reply_and_scores(tokenizer):
    from rlhfkit.eval.gold import vader_scorer
    from rlhfkit.data.tokenize import tokenize_prompt
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.models.reward_model import load_reward_model, score_sequences

    model = load_causal_lm("embedded")
    prompt = tokenize_prompt(tokenizer, "What is your favourite sport?", 64)
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    # A real instruct model answers in English words, not random tokens.
    words = reply.lower().split()
    assert len(words) >= 4
    assert sum(w.strip(".,!?'") in {"i", "my", "is", "the", "a", "to", "you", "sport", "favorite", "favourite"} for w in words) >= 2
    gold = vader_scorer()(["What is your favourite sport?"], [reply])[0]
    assert -1.0 <= gold <= 1.0
    rm = load_reward_model("embedded", tokenizer.pad_token_id)
    full = torch.tensor([out[0].tolist()])
    with torch.no_grad():
        score = score_sequences(rm, full, torch.ones_like(full))
    assert score.shape == (1,) and torch.isfinite(score).all()
