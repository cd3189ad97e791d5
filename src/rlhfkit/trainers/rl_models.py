"""What the sampling trainers (PPO, GRPO, RLOO) load alike: prompts, frozen models (the reference, the reward
model) and the optional gold scorer, plus prompt encoding and gold scores for their model bundles."""

from __future__ import annotations

from rlhfkit.data.text import prompt_text
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.errors import UserError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.precision import store_linears_in_bf16
from rlhfkit.models.reward_model import load_reward_model
from rlhfkit.rollout.scoring import RewardScorer
from rlhfkit.data.stage_records import prompt_records


class PromptsAndGold:
    """Shared by the models of the sampling trainers (fields `tokenizer`, `gold`, `config`): prompt token ids
    and gold scores of samples, for logging only."""

    def encode_prompts(self, records: list[dict]) -> list[list[int]]:
        c = self.config
        return [tokenize_prompt(self.tokenizer, r["prompt"], c.max_prompt_length, c.use_chat_template, c.system_prompt)
                for r in records]

    def gold_scores(self, records: list[dict], texts: list[str]) -> list[float]:
        return self.gold([prompt_text(r["prompt"]) for r in records], texts)


def load_prompts_for(config, keep_extra: bool = False) -> list[dict]:
    """Training prompts: --data, else the embedded corpus; `keep_extra` keeps records' other fields (e.g. an
    `answer` for a reward function)."""
    records = prompt_records(config.data, "train", keep_extra=keep_extra)
    if not records:
        raise UserError("no prompts to train on")
    return records


def _frozen(model, config):
    model.requires_grad_(False).eval()
    if config.mixed_precision == "bf16":  # frozen models run only under autocast (rollout and scoring)
        store_linears_in_bf16(model)
    return model


def load_reference(config):
    """The frozen reference policy: --ref-model, else the starting policy."""
    return _frozen(load_causal_lm(config.ref_model or config.model, config.dtype, config.trust_remote_code,
                                  config.attn_implementation, config.device), config)


def load_reward_scorer(config, policy_tokenizer) -> RewardScorer:
    """The frozen reward model of --reward-model, scoring with its own tokenizer when it has one."""
    tokenizer = load_tokenizer(config.reward_model, config.trust_remote_code)
    model = load_reward_model(config.reward_model, tokenizer.pad_token_id, config.dtype, config.trust_remote_code,
                              config.attn_implementation, config.device)
    return RewardScorer(_frozen(model, config), tokenizer, policy_tokenizer, config.max_prompt_length,
                        config.use_chat_template, config.system_prompt)


def load_gold(config):
    """The optional gold scorer (logging only), or None."""
    if not config.gold_scorer:
        return None
    from rlhfkit.eval.gold import load_gold_scorer

    return load_gold_scorer(config.gold_scorer)
