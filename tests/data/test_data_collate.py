"""Left padding, masks and position ids."""

import pytest
import torch

from rlhfkit.data import collate_pairs, collate_prompts, collate_sft, left_pad


def test_left_pad():
    out = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


def test_left_pad_errors():
    with pytest.raises(ValueError, match="empty batch"):
        left_pad([], 0)
    with pytest.raises(ValueError, match="extra 'm'"):
        left_pad([[1, 2]], 0, extra={"m": [[1]]})


def test_collate_sft():
    batch = [{"input_ids": [10, 11, 12, 13], "loss_mask": [0, 0, 1, 1]},
             {"input_ids": [20, 21], "loss_mask": [0, 1]}]
    out = collate_sft(batch, pad_id=9)
    assert out["input_ids"].tolist() == [[10, 11, 12, 13], [9, 9, 20, 21]]
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert set(out) == {"input_ids", "attention_mask", "position_ids", "loss_mask"}


def test_collate_pairs_chosen_then_rejected():
    batch = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "margin": 2.0},
             {"prompt_ids": [6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]}]
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [1, 2, 4, 5], [0, 0, 6, 10]]
    assert out["response_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 0, 1]]
    assert out["margin"].tolist() == [2.0, 0.0]
    assert "margin" not in collate_pairs(batch[1:], pad_id=0)


def test_collate_prompts():
    out = collate_prompts([[1, 2, 3], [4]], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert out["position_ids"][1, -1].item() == 0


def test_left_padding_does_not_change_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    batch = collate_prompts([[3, 4, 5, 6, 7], [8, 9]], pad_id=0)
    with torch.no_grad():
        padded = model(**batch).logits[1, -2:]
        alone = model(input_ids=torch.tensor([[8, 9]])).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
