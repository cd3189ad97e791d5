"""Sampling responses with HF `generate` (KV cache) from left-padded prompts.

Each response is cut after its first EOS (the EOS itself is kept: it is the action that ends the episode).
A response that reaches `max_new_tokens` without EOS is returned as is, with `ended=False`, so callers can
treat it as truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.collate import collate_prompts


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    ended: bool  # True when the response finished with EOS within the length limit


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1], True
    return tokens, False


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, batch_size: int = 32, progress: bool = False) -> list[Sample]:
    """One sampled response per prompt (repeat a prompt in `prompts` to get several)."""
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    # A config of our own, not merged with the model's: a folder's generation_config.json may carry a
    # repetition penalty or a min length, which would make the samples come from another distribution
    # than the softmax(logits / T) that PPO and the KL estimate score them under.
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    was_training = model.training
    model.eval()
    samples = []
    from tqdm.auto import tqdm

    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
        chunk = prompts[start:start + batch_size]
        batch = collate_prompts(chunk, tokenizer.pad_token_id)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=config)
        width = batch["input_ids"].shape[1]
        for prompt, row in zip(chunk, out[:, width:].tolist()):
            response, ended = cut_at_eos(row, eos)
            samples.append(Sample(prompt, response, ended))
    model.train(was_training)
    return samples
