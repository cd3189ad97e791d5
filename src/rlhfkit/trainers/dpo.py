"""DPO: the policy trained directly on (prompt, chosen, rejected) pairs against a frozen reference.

Each step: sequence log-probs of the chosen and rejected responses under the policy (one forward over the
2B rows of a pair batch) and under the reference (a frozen model, or numbers computed once before training
with `precompute_ref_logprobs`), then `core.dpo.dpo_loss`. The shared supervised loop does the rest
(accumulation, clipping, schedule, evaluation, checkpoints, resume).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhfkit.config import DPOConfig
from rlhfkit.track.stage import tracked
from rlhfkit.core.dpo import dpo_loss, sequence_logps
from rlhfkit.data.collate import collate_pairs
from rlhfkit.data.tokenize import tokenize_preference
from rlhfkit.models.loading import check_fits_context, load_causal_lm, load_tokenizer, set_gradient_checkpointing
from rlhfkit.models.precision import store_linears_in_bf16
from rlhfkit.models.roles import Role
from rlhfkit.models.trained import base_path, load_trained_weights, save_trained, uses_lora, with_lora, write_merged
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.precision import autocast
from rlhfkit.rollout.scoring import tail_logprobs
from rlhfkit.data.length_buckets import bucket_overhead, forward_in_buckets
from rlhfkit.runtime.distributed import sum_over_shares
from rlhfkit.trainers.supervised_loop import SupervisedTask, held_out_batches, run_supervised
from rlhfkit.runtime.output_dir import prepare_output_dir, resolve_output_dir
from rlhfkit.data.stage_records import train_eval_records
from rlhfkit.runtime.device import resolve_device, to_device
from rlhfkit.runtime.precision import resolve_precision


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and rejected halves of a `collate_pairs` batch: (B,), (B,).

    Left padding puts every response at the end of its row, so the last R columns (R = the longest response)
    hold them all; of those, only the response tokens go through the LM head. Rows of similar length run
    together, each bucket without its pad columns (data/length_buckets)."""
    def bucket(sub: dict) -> torch.Tensor:
        R = int(sub["response_mask"].sum(dim=1).max())
        mask = sub["response_mask"][:, -R:]
        token_logps, _ = tail_logprobs(model, sub["input_ids"], sub["attention_mask"], sub["position_ids"],
                                       sub["input_ids"][:, -R:], mask=mask)  # (b, R), 0 off the mask
        return sequence_logps(token_logps, mask)  # (b,)

    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids", "response_mask")}
    logps = forward_in_buckets(bucket, inputs, bucket_overhead(model))  # (2B,)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def reference_logps(ref, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's pair log-probs: precomputed numbers carried by the batch, else a no-grad forward."""
    if "ref_chosen" in batch:
        return batch["ref_chosen"], batch["ref_rejected"]
    with torch.no_grad():
        return pair_logps(ref, batch)


def pair_loss(model, ref, batch: dict, config: DPOConfig):
    """DPO loss and metrics of one pair batch, and its number of pairs."""
    chosen, rejected = pair_logps(model, batch)
    loss, metrics = dpo_loss(chosen, rejected, *reference_logps(ref, batch), beta=config.beta,
                             loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    return loss, metrics, chosen.shape[0]


def precompute_reference(ref, examples: list[dict], collate, batch_size: int, mixed_precision: str,
                         device_type: str = "cpu") -> None:
    """Store the reference's log-probs of each pair in its example (`ref_chosen`, `ref_rejected`)."""
    with torch.no_grad(), autocast(mixed_precision, device_type):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            chosen, rejected = pair_logps(ref, collate(chunk))
            for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                example["ref_chosen"], example["ref_rejected"] = c, r


def evaluate_dpo(model, ref, examples: list, collate, config: DPOConfig) -> dict:
    """Held-out DPO loss, implicit-reward accuracy and margin, averaged over pairs (each process evaluates its
    share of the batches; the sums are added over processes)."""
    size = config.batch_size

    def sums(k: int) -> dict:
        loss, metrics, pairs = pair_loss(model, ref, collate(examples[k * size:(k + 1) * size]), config)
        return {"pairs": pairs, **{key: float(value) * pairs for key, value in {"loss": loss, **metrics}.items()}}

    totals = sum_over_shares(held_out_batches(len(examples), size, config.eval_batches), sums)
    seen = max(totals.pop("pairs", 0.0), 1.0)
    return {key.removeprefix("dpo/"): value / seen for key, value in totals.items()}


@tracked("dpo")
def run_dpo(config: DPOConfig) -> Path:
    device = resolve_device(config)
    resolve_precision(config, device.type)
    out = resolve_output_dir(config, "dpo")
    train_records, eval_records = train_eval_records(config, "preference")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    train, evals = [[tokenize_preference(tokenizer, r, config.max_prompt_length, config.max_length,
                                         config.use_chat_template, config.system_prompt) for r in records]
                    for records in (train_records, eval_records)]
    seed_everything(config.seed)  # before the adapter: LoRA's A matrices are initialised from the RNG
    model = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation, device)
    with_lora(model, config)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    if uses_lora(config) and config.ref_model in (None, config.model):
        # The reference is the same base with the adapter off: no second model in memory.
        model, ref = Role(model, "default"), Role(model, None)
    else:
        ref = load_causal_lm(config.ref_model or config.model, config.dtype, config.trust_remote_code,
                             config.attn_implementation, device)
        ref.requires_grad_(False).eval()
    for loaded in (model, ref):
        check_fits_context(loaded, config.max_length, "max_length")
    if config.mixed_precision == "bf16" and not isinstance(ref, Role):  # the reference runs only under autocast
        store_linears_in_bf16(ref)
    prepare_output_dir(out, config)

    def collate(batch):
        collated = collate_pairs(batch, tokenizer.pad_token_id)
        if all("ref_chosen" in example for example in batch):
            collated["ref_chosen"] = torch.tensor([example["ref_chosen"] for example in batch])
            collated["ref_rejected"] = torch.tensor([example["ref_rejected"] for example in batch])
        return to_device(collated, device)

    if config.precompute_ref_logprobs:
        precompute_reference(ref, train + evals, collate, config.batch_size, config.mixed_precision, device.type)
        ref = None  # freed: training holds one model

    def loss_fn(model, batch: dict, normaliser: float):
        loss, metrics, size = pair_loss(model, ref, batch, config)
        # dpo_loss averages over this micro-batch's pairs; rescale so that the micro-batches of one
        # accumulation window add up to the mean over all of its pairs.
        return loss * (size / normaliser), metrics

    task = SupervisedTask(
        model=model, train_examples=train, collate=collate, loss=loss_fn,
        units=lambda batch: batch["input_ids"].shape[0] // 2,
        save_model=lambda folder, state=None: save_trained(model, tokenizer, folder, base_path(config), state),
        load_model=lambda folder: load_trained_weights(model, folder),
        evaluate=(lambda: evaluate_dpo(model, ref, evals, collate, config)) if evals else None)
    run_supervised(task, config, out, "dpo")
    if uses_lora(config) and config.merge:
        write_merged(out, tokenizer, lambda: load_causal_lm(config.model, config.dtype, config.trust_remote_code,
                                                             config.attn_implementation))
    return out
