from pathlib import Path

import pytest
import torch

from rlhfkit.core.positions import last_token_index, position_ids_from_mask
from rlhfkit.data.collate import collate_prompts
from rlhfkit.errors import UserError
from rlhfkit.models.loading import choose_pad_token, load_causal_lm, resolve_model_path
from rlhfkit.models.reward_model import score_sequences
from tests.tolerances import close


def test_pad_token_is_distinct_from_eos(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_choose_pad_token_keeps_a_distinct_pad_and_falls_back_to_eos():
    class Tok:
        eos_token, unk_token = "</s>", None

        def __init__(self, pad, vocab):
            self.pad_token, self._vocab = pad, vocab

        def get_vocab(self):
            return self._vocab

    keep = Tok("<pad>", {"<pad>": 0, "</s>": 1})
    choose_pad_token(keep)
    assert keep.pad_token == "<pad>"
    reuse = Tok("</s>", {"</s>": 1, "<|endoftext|>": 5})
    choose_pad_token(reuse)
    assert reuse.pad_token == "<|endoftext|>"
    nothing = Tok(None, {"</s>": 1})
    choose_pad_token(nothing)
    assert nothing.pad_token == "</s>"


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 2, 3, 0]
    assert position_ids_from_mask(mask)[0].tolist() == [0, 0, 0, 1]


def test_missing_folder_and_folder_without_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="config.json is missing"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_causal_lm(str(tmp_path))


def test_left_padded_greedy_generation_matches_unpadded(tokenizer, tiny_model):
    """Left padding must not change what the model does: position ids and masks must be right."""
    short = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    long = tokenizer("A much longer prompt that forces the short one to be padded", add_special_tokens=False)["input_ids"]
    batch = collate_prompts([short, long], tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    padded = tiny_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    alone = tiny_model.generate(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long), **kwargs)
    assert padded[0, -6:].tolist() == alone[0, -6:].tolist()


def test_reward_score_is_the_same_padded_or_not(tokenizer, tmp_path, tiny_model):
    from rlhfkit.models.reward_model import load_reward_model

    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    rm = load_reward_model(tmp_path / "m", tokenizer.pad_token_id)
    rm.eval()
    a = tokenizer("I like cricket", add_special_tokens=False)["input_ids"]
    b = tokenizer("The weather is awful today, sadly", add_special_tokens=False)["input_ids"]
    batch = collate_prompts([a, b], tokenizer.pad_token_id)
    with torch.no_grad():
        together = score_sequences(rm, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        alone = score_sequences(rm, torch.tensor([a]), torch.ones(1, len(a), dtype=torch.long))
    assert together.shape == (2,)
    hidden = rm.config.hidden_size
    close(together[0], alone[0], *[hidden] * (rm.config.num_hidden_layers + 1))  # each layer, then the score head



def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings of files whose name ends with `suffix` (Linux)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(suffix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_loaded_weights_live_in_process_memory_not_in_the_mapped_checkpoint():
    """transformers maps the safetensors file and hands out views of it; the pages a frozen model read through
    them stayed resident as file pages (0.9 GB of the embedded LoRA PPO run's peak). After loading, no weight or
    buffer points into a mapping of a safetensors file, the values are the file's, and tied weights stay one."""
    from safetensors.torch import load_file

    from rlhfkit.models.reward_model import load_reward_model

    on_disk = {k: v.clone() for k, v in load_file(str(resolve_model_path("tiny") / "model.safetensors")).items()}
    for model in (load_causal_lm("tiny"), load_reward_model("tiny", 0)):
        mapped = _file_mappings(".safetensors")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            inside = [r for r in mapped if r[0] <= tensor.data_ptr() < r[1]]
            assert not inside, f"{name} is a view of a mapped checkpoint file"
        state = model.state_dict()
        for name, value in on_disk.items():  # every weight of the file, under the same name in both classes
            assert torch.equal(state[name], value), name
        head = model.get_output_embeddings()
        if head is not None and model.config.tie_word_embeddings:
            assert head.weight is model.get_input_embeddings().weight
