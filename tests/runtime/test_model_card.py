"""Model cards (runtime/model_card.py): HF's metadata, parsed back with huggingface_hub, and the body's settings."""

import dataclasses
import json

import pytest
import yaml
from huggingface_hub import ModelCard

from rlhfkit.config import PPOConfig, RewardConfig, SFTConfig
from rlhfkit.runtime.model_card import EMBEDDED_ID, read_card_metadata, write_model_card

from ..trainers.helpers import tiny_config, write_jsonl

EVALUATION = {"model": "runs/ppo", "ref_model": "runs/sft", "gold_scorer": "vader", "n": 150, "n_prompts": 75,
              "samples_per_prompt": 2, "gold_reward_mean": 0.191, "gold_reward_ci95": [0.131, 0.251],
              "kl_exact_mean": 5.1, "kl_exact_ci95": [4.5, 5.6], "kl_to_reference_mean": 4.9,
              "kl_to_reference_ci95": [4.0, 5.8], "win_rate_vs_reference_mean": 0.57,
              "win_rate_vs_reference_ci95": [0.52, 0.62]}


def settings_block(text: str) -> dict:
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_embedded_sft_card_has_hub_metadata_and_every_setting(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    config = SFTConfig(model="embedded", learning_rate=3e-5, output_dir=str(folder))
    write_model_card(folder, config, "sft")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model == EMBEDDED_ID
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["rlhfkit", "sft"] and card.data.eval_results is None
    assert settings_block(card.text)["learning_rate"] == 3e-5
    assert settings_block(card.text) == yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))


def test_a_later_stage_inherits_the_lineage_and_gets_its_evaluation(tmp_path):
    sft, ppo = tmp_path / "sft", tmp_path / "ppo"
    sft.mkdir(), ppo.mkdir()
    write_model_card(sft, SFTConfig(model="embedded"), "sft")
    config = PPOConfig(model=str(sft), reward_model=str(tmp_path / "rm"), kl_coef=0.1)
    write_model_card(ppo, config, "ppo", EVALUATION)
    card = ModelCard.load(ppo / "README.md")
    assert card.data.base_model == EMBEDDED_ID and card.data.license == "apache-2.0"  # through the SFT folder's card
    assert card.data.tags == ["rlhfkit", "ppo", "rlhf"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"gold_reward", "kl_exact", "kl_to_reference", "win_rate_vs_reference"}
    assert results["kl_exact"].metric_value == 5.1 and results["gold_reward"].metric_value == 0.191
    assert results["kl_exact"].task_type == "text-generation"
    assert card.data.model_name == "ppo"
    assert f"| Base model | `{sft}` (from {EMBEDDED_ID}) |" in card.text
    assert "| KL to reference (nats, exact) | 5.100 | [4.500, 5.600] |" in card.text
    assert f"| Reward model | `{tmp_path / 'rm'}` |" in card.text and settings_block(card.text)["kl_coef"] == 0.1


def test_hub_ids_come_only_from_what_is_known(tmp_path):
    cached = tmp_path / "hub" / "models--someorg--base-model" / "snapshots" / "abc123"
    data = tmp_path / "hub" / "datasets--someorg--prefs" / "snapshots" / "def" / "train.jsonl"
    folder = tmp_path / "rm"
    folder.mkdir()
    write_model_card(folder, RewardConfig(model=str(cached), data=str(data)), "reward")
    meta = read_card_metadata(folder)
    assert meta["base_model"] == "someorg/base-model" and meta["datasets"] == ["someorg/prefs"]
    assert meta["pipeline_tag"] == "text-classification" and "license" not in meta
    assert "AutoModelForSequenceClassification.from_pretrained" in (folder / "README.md").read_text()
    # A random tiny model or a local folder without a card: no base_model at all (the Hub refuses a non-id).
    plain = tmp_path / "plain"
    plain.mkdir()
    write_model_card(folder, SFTConfig(model=str(plain)), "sft")
    assert "base_model" not in read_card_metadata(folder) and "datasets" not in read_card_metadata(folder)
    write_model_card(folder, SFTConfig(model="tiny"), "sft")
    assert "base_model" not in read_card_metadata(folder)


def test_an_adapter_folder_is_a_peft_card_and_a_merged_model_gets_its_own(tmp_path):
    folder = tmp_path / "dpo"
    (folder / "merged").mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "merged" / "config.json").write_text("{}")
    write_model_card(folder, SFTConfig(model="embedded"), "dpo")
    assert ModelCard.load(folder / "README.md").data.library_name == "peft"
    assert "AutoPeftModelForCausalLM" in (folder / "README.md").read_text()
    merged = ModelCard.load(folder / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and merged.data.base_model == EMBEDDED_ID


def test_every_training_stage_writes_a_card(tmp_path):
    from rlhfkit.trainers.grpo import run_rloo
    from rlhfkit.trainers.reward import run_reward

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w}"} for w in "abcdefgh"])
    out = tmp_path / "rloo"
    run_rloo(tiny_config("rloo", data=prompts, reward_function="tests.trainers.rewards:short", output_dir=out,
                         max_steps=1, progress=False))
    card = ModelCard.load(out / "README.md")
    assert card.data.tags == ["rlhfkit", "rloo", "rlhf"] and "base_model" not in card.data.to_dict()
    assert f"| Data | `{prompts}` |" in card.text and "tests.trainers.rewards:short" in card.text
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "good day", "rejected": "bad"}] * 8)
    run_reward(tiny_config("reward", data=pairs, output_dir=tmp_path / "rm", max_steps=1, eval_fraction=0.0,
                           progress=False))
    assert read_card_metadata(tmp_path / "rm")["tags"] == ["rlhfkit", "reward-model"]
    assert json.loads((tmp_path / "rm" / "config.json").read_text())  # the card sits beside the model


@pytest.mark.parametrize("text", ["no front matter", "---\n: : bad yaml [\n---\n"])
def test_a_card_without_readable_metadata_reads_as_empty(tmp_path, text):
    (tmp_path / "README.md").write_text(text)
    assert read_card_metadata(tmp_path) == {}
