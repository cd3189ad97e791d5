"""Supervised fine-tuning: maximise log p(completion | prompt); prompt tokens carry no loss."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhfkit.config import SFTConfig
from rlhfkit.track.stage import tracked
from rlhfkit.data.length_buckets import bucket_overhead, forward_in_buckets
from rlhfkit.core.logprobs import logprobs_from_logits, shift_for_causal_lm
from rlhfkit.core.sft_loss import completion_nll_loss
from rlhfkit.data.collate import collate_sft
from rlhfkit.data.tokenize import tokenize_sft
from rlhfkit.models.loading import check_fits_context, load_causal_lm, load_tokenizer, set_gradient_checkpointing
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.distributed import sum_over_shares
from rlhfkit.trainers.supervised_loop import SupervisedTask, held_out_batches, run_supervised
from rlhfkit.models.trained import base_path, load_trained_weights, save_trained, uses_lora, with_lora, write_merged
from rlhfkit.runtime.output_dir import prepare_output_dir, resolve_output_dir
from rlhfkit.data.stage_records import train_eval_records
from rlhfkit.runtime.device import resolve_device, to_device
from rlhfkit.runtime.precision import resolve_precision


def completion_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token and the mask of those that are completion tokens: both (B, T-1). Rows of
    similar length run together, each bucket without its pad columns (data/length_buckets)."""
    def bucket(sub: dict) -> torch.Tensor:
        logits = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"],
                       position_ids=sub["position_ids"]).logits  # (b, w, V)
        logits, labels = shift_for_causal_lm(logits, sub["input_ids"])
        return logprobs_from_logits(logits, labels)  # (b, w-1)

    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}
    return forward_in_buckets(bucket, inputs, bucket_overhead(model)), batch["loss_mask"][:, 1:]


def sft_loss(model, batch: dict, normaliser: float):
    logprobs, mask = completion_logprobs(model, batch)
    return completion_nll_loss(logprobs, mask, num_tokens=normaliser)


def evaluate_nll(model, examples: list, collate, batch_size: int, max_batches: int = 0) -> dict:
    """Token-mean NLL of completions over held-out examples, and its perplexity (each process evaluates its
    share of the batches; the sums are added over processes)."""
    def sums(k: int) -> dict:
        logprobs, mask = completion_logprobs(model, collate(examples[k * batch_size:(k + 1) * batch_size]))
        return {"nll": -torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs)).sum().item(),
                "tokens": mask.sum().item()}

    total = sum_over_shares(held_out_batches(len(examples), batch_size, max_batches), sums)
    mean = total.get("nll", 0.0) / max(total.get("tokens", 0.0), 1.0)
    return {"nll": mean, "perplexity": math.exp(min(mean, 50.0))}


@tracked("sft")
def run_sft(config: SFTConfig) -> Path:
    """Train; write the model folder, config.yaml, metrics.jsonl and checkpoints under output_dir."""
    device = resolve_device(config)
    resolve_precision(config, device.type)
    out = resolve_output_dir(config, "sft")
    train_records, eval_records = train_eval_records(config, "sft")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)

    def encode(records):
        return [tokenize_sft(tokenizer, r, config.max_prompt_length, config.max_length, config.use_chat_template,
                             config.system_prompt)
                for r in records]

    train, evals = encode(train_records), encode(eval_records)
    seed_everything(config.seed)
    model = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation, device)
    with_lora(model, config)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    check_fits_context(model, config.max_length, "max_length")
    prepare_output_dir(out, config)

    def collate(batch):
        return to_device(collate_sft(batch, tokenizer.pad_token_id), device)

    task = SupervisedTask(
        model=model, train_examples=train, collate=collate, loss=sft_loss,
        units=lambda batch: batch["loss_mask"][:, 1:].sum().item(),
        save_model=lambda folder, state=None: save_trained(model, tokenizer, folder, base_path(config), state),
        load_model=lambda folder: load_trained_weights(model, folder),
        evaluate=(lambda: evaluate_nll(model, evals, collate, config.batch_size, config.eval_batches))
        if evals else None)
    run_supervised(task, config, out, "sft")
    if uses_lora(config) and config.merge:
        write_merged(out, tokenizer, lambda: load_causal_lm(config.model, config.dtype, config.trust_remote_code,
                                                             config.attn_implementation))
    return out
