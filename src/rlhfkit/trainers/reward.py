"""Reward-model training: LM trunk + scalar head, Bradley-Terry loss on (chosen, rejected) pairs."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.config import RewardConfig
from rlhfkit.track.stage import tracked
from rlhfkit.core.bradley_terry import bradley_terry_loss
from rlhfkit.data.collate import collate_pairs
from rlhfkit.data.text import prompt_text, response_text
from rlhfkit.data.tokenize import tokenize_preference
from rlhfkit.models.loading import check_fits_context, load_tokenizer, set_gradient_checkpointing
from rlhfkit.models.reward_model import load_reward_model, score_sequences
from rlhfkit.models.trained import base_path, load_trained_weights, save_trained, uses_lora, with_lora, write_merged
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.distributed import sum_over_shares
from rlhfkit.trainers.supervised_loop import SupervisedTask, held_out_batches, run_supervised
from rlhfkit.runtime.output_dir import prepare_output_dir, resolve_output_dir
from rlhfkit.data.stage_records import train_eval_records
from rlhfkit.runtime.device import resolve_device, to_device
from rlhfkit.runtime.precision import resolve_precision


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected halves of a collated pair batch: (B,), (B,)."""
    scores = score_sequences(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (2B,)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def reward_loss(use_margin: bool):
    def loss_fn(model, batch: dict, normaliser: float):
        chosen, rejected = pair_scores(model, batch)
        margin = batch.get("margin") if use_margin else None
        loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin)
        # bradley_terry_loss averages over this micro-batch's pairs; rescale so the micro-batches of one
        # accumulation window add up to the mean over all of its pairs.
        return loss * (chosen.shape[0] / normaliser), metrics

    return loss_fn


def evaluate_pairs(model, examples: list, collate, batch_size: int, gold_diffs: list[float] | None,
                   max_batches: int = 0) -> dict:
    """Held-out loss and accuracy (a tie counts half); with gold score differences, agreement of the RM's order
    with gold's over the pairs gold decides. Each process evaluates its share of the batches; the counts are
    added over processes."""
    def sums(k: int) -> dict:
        start = k * batch_size
        chosen, rejected = pair_scores(model, collate(examples[start:start + batch_size]))
        d = chosen - rejected  # (b,)
        out = {"loss": bradley_terry_loss(chosen, rejected)[0].item() * d.shape[0], "pairs": d.shape[0],
               "correct": ((d > 0).float() + 0.5 * (d == 0).float()).sum().item()}
        if gold_diffs is not None:
            gold = torch.tensor(gold_diffs[start:start + d.shape[0]], dtype=d.dtype)
            decided = gold != 0
            out["gold_decided"] = decided.sum().item()
            out["gold_agree"] = (torch.sign(d[decided]) == torch.sign(gold[decided])).sum().item()
        return out

    total = sum_over_shares(held_out_batches(len(examples), batch_size, max_batches), sums)
    pairs = max(total.get("pairs", 0.0), 1.0)
    metrics = {"loss": total.get("loss", 0.0) / pairs, "accuracy": total.get("correct", 0.0) / pairs}
    if gold_diffs is not None:
        decided = total.get("gold_decided", 0.0)
        metrics["gold_agreement"] = total.get("gold_agree", 0.0) / decided if decided else float("nan")
    return metrics


@tracked("reward")
def run_reward(config: RewardConfig) -> Path:
    device = resolve_device(config)
    resolve_precision(config, device.type)
    out = resolve_output_dir(config, "reward")
    train_records, eval_records = train_eval_records(config, "preference")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)

    def encode(records):
        examples = []
        for record in records:
            example = tokenize_preference(tokenizer, record, config.max_prompt_length, config.max_length,
                                          config.use_chat_template, config.system_prompt)
            example["margin"] = float(record.get("margin") or 0.0)
            examples.append(example)
        return examples

    train, evals = encode(train_records), encode(eval_records)
    gold_diffs = None
    if config.gold_scorer and eval_records:
        from rlhfkit.eval.gold import load_gold_scorer

        scorer = load_gold_scorer(config.gold_scorer)
        prompts = [prompt_text(r["prompt"]) for r in eval_records]
        chosen = scorer(prompts, [response_text(r["chosen"]) for r in eval_records])
        rejected = scorer(prompts, [response_text(r["rejected"]) for r in eval_records])
        gold_diffs = [c - r for c, r in zip(chosen, rejected)]
    seed_everything(config.seed)  # the fresh scalar head is initialised from the RNG
    model = load_reward_model(config.model, tokenizer.pad_token_id, config.dtype, config.trust_remote_code,
                              config.attn_implementation, device)
    with_lora(model, config, score_head=True)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    check_fits_context(model, config.max_length, "max_length")
    prepare_output_dir(out, config)

    def collate(batch):
        collated = collate_pairs(batch, tokenizer.pad_token_id)
        collated["margin"] = torch.tensor([example["margin"] for example in batch])
        return to_device(collated, device)

    task = SupervisedTask(
        model=model, train_examples=train, collate=collate, loss=reward_loss(config.use_margin),
        units=lambda batch: batch["margin"].shape[0],
        save_model=lambda folder, state=None: save_trained(model, tokenizer, folder, base_path(config), state),
        load_model=lambda folder: load_trained_weights(model, folder),
        evaluate=(lambda: evaluate_pairs(model, evals, collate, config.batch_size, gold_diffs, config.eval_batches))
        if evals else None,
        lr_overrides={"score": config.learning_rate * config.head_lr_multiplier})
    run_supervised(task, config, out, "reward")
    if uses_lora(config) and config.merge:
        write_merged(out, tokenizer, lambda: load_reward_model(config.model, tokenizer.pad_token_id, config.dtype,
                                                               config.trust_remote_code, config.attn_implementation))
    return out
