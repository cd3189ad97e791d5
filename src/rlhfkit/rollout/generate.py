"""Sampling responses from left-padded prompts with a KV cache: our own decoding loop.

Each response is cut after its first EOS (the EOS itself is kept: it is the action that ends the episode).
A response that reaches `max_new_tokens` without EOS is returned as is, with `ended=False`, so callers can
treat it as truncated.

Why not `model.generate`: on a 2-core CPU its per-step overhead and `torch.multinomial` over a 49k vocabulary
(28 ms for 32 rows) cost as much as the 135M-parameter forward itself. This loop samples by inverting the
CDF (one uniform per row, 1 ms), draws from softmax(logits / T) with the LM head in fp32 as scoring computes it
(so the samples come from the distribution PPO scores them under), drops finished rows from the batch and
the cache, and reads nothing from a model's `generation_config.json` (whose repetition penalty or minimum
length would make the samples off-policy).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlhfkit.core.logprobs import logprobs_from_logits
from rlhfkit.data.collate import collate_prompts
from rlhfkit.models.precision import bf16_weights
from rlhfkit.models.roles import Role
from rlhfkit.runtime.device import module_device, to_device
from rlhfkit.rollout.scoring import has_own_logit_path, lm_head_logits


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    ended: bool  # True when the response finished with EOS within the length limit
    # log softmax(logits / T) of each response token as the sampling pass computed it (full distribution,
    # before top-p), aligned with response_ids
    logprobs: list[float] | None = None


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1], True
    return tokens, False


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}


def sample_seeds(seed: int, iteration: int, indices: list[int]) -> list[int]:
    """The seed of each sample: a function of the run's seed, the iteration and the sample's index in the
    iteration's global batch (numpy's SeedSequence mixes them), not of the process that samples it, so the
    same global batch gives the same samples on any number of processes."""
    import numpy as np

    return [int(np.random.SeedSequence([seed % 2**63, iteration, index]).generate_state(1, np.uint64)[0])
            for index in indices]


def sample_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """(len(seeds), steps) float64 uniforms in [0, 1): row i from a generator of its own seeded with seeds[i],
    whatever rows it is batched with (one stream per sample; the global RNG's would interleave the batch's)."""
    return torch.stack([torch.rand(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                        for seed in seeds]) if seeds else torch.zeros(0, steps, dtype=torch.float64)


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                       u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the top-p nucleus: (B, V) -> (B,) long.

    Inverse-CDF sampling with one uniform per row: `u` (B, 1) float64, or drawn from the global RNG (so a seed
    fixes the samples either way). With
    top_p < 1, the kept tokens are the most likely ones whose cumulative probability before them is < top_p
    (at least one), as in Holtzman et al. 2020 and transformers' TopPLogitsWarper.
    """
    logits = logits.float()
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if u is None:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)  # (B, 1) in [0, 1)
    return inverse_cdf(probs, u.to(probs.device))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The token j with cdf[j-1] <= u * total < cdf[j] in each row: probs (B, V) >= 0, u (B, 1) float64 in [0, 1).

    Two levels, in float64 so that the tail's tiny masses stay exact: the cumulative mass of blocks of `block`
    tokens picks a block, then the cumulative sum inside that one block picks the token. A full float64
    cumsum over a 49k vocabulary cost 7 of the ~9 ms per decoding step spent on sampling (32 rows, 2 cores).
    A token of zero mass is never drawn.
    """
    B, V = probs.shape
    pad = (-V) % block
    blocks = torch.nn.functional.pad(probs, (0, pad)).view(B, -1, block)  # (B, NB, block)
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, NB)
    target = u * block_cdf[:, -1:]  # (B, 1)
    # The first block whose cumulative mass exceeds the target; it has positive mass since the cdf rose there.
    b = torch.searchsorted(block_cdf, target, right=True).clamp(max=block_cdf.shape[1] - 1)  # (B, 1)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, b[..., None].expand(B, 1, block)).squeeze(1).double().cumsum(-1)  # (B, block)
    j = torch.searchsorted(inner, target - before, right=True)
    # Rounding may put the target at the block's very end: take its last token of positive mass instead.
    last = (inner < inner[:, -1:]).sum(-1, keepdim=True)
    return (b * block + torch.minimum(j, last)).squeeze(1)


def _cache_keyword(module) -> str:
    """The name `module.forward` takes its KV cache under: transformers 5.x renamed `past_key_values` to `cache`
    (the old name warns on every call and goes in 5.40); earlier versions and remote code know only the old one."""
    return _cache_keyword_of(type(module))


@functools.cache
def _cache_keyword_of(kind: type) -> str:
    return "cache" if "cache" in inspect.signature(kind.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out["cache"] if "cache" in out else out.past_key_values


def _next_logits(model, input_ids, attention_mask, position_ids, cache):
    """Logits of the next token (B, V) float32 and the updated cache."""
    owner = getattr(model, "shared_base", model)  # a LoRA role (models/roles.py) runs its shared base's modules
    if has_own_logit_path(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{_cache_keyword(owner): cache})
        return out.logits[:, -1].float(), _returned_cache(out)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **{_cache_keyword(owner.base_model): cache})
    return lm_head_logits(model, out.last_hidden_state[:, -1]), _returned_cache(out)


@torch.inference_mode()  # not just no_grad: no version counters or view tracking, ~4% off a rollout
def _decode(model, batch: dict, max_new_tokens: int, temperature: float, top_p: float, eos: set[int],
            with_logprobs: bool = False, uniforms: torch.Tensor | None = None
            ) -> tuple[list[list[int]], list[list[float] | None]]:
    """Token lists (cut after EOS) for one left-padded batch of prompts, and their sampling log-probs (None
    per row unless `with_logprobs`: they cost a log-softmax over the vocabulary at every step). `uniforms`
    (B, max_new_tokens) float64: row i's draw at each step (else the global RNG's)."""
    B = batch["input_ids"].shape[0]
    responses: list[list[int]] = [[] for _ in range(B)]
    eos_tensor = torch.tensor(sorted(eos), device=batch["input_ids"].device)
    attention_mask, position_ids = batch["attention_mask"], batch["position_ids"]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    logits, cache = _next_logits(model, batch["input_ids"], attention_mask, position_ids, None)
    position_ids = position_ids[:, -1:]  # (b, 1)
    rows = torch.arange(B, device=eos_tensor.device)  # original row of each row still decoding
    for step in range(max_new_tokens):
        u = None if uniforms is None else uniforms[rows, step:step + 1]  # (b, 1)
        tokens = sample_from_logits(logits, temperature, top_p, u)  # (b,)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            responses[row].append(token)
        if with_logprobs:
            token_logprobs = logprobs_from_logits(logits[:, None], tokens[:, None], temperature)[:, 0]  # (b,)
            for row, logprob in zip(rows.tolist(), token_logprobs.tolist()):
                logprobs[row].append(logprob)
        if step == max_new_tokens - 1:
            break
        alive = ~torch.isin(tokens, eos_tensor)  # (b,)
        if not alive.any():
            break
        if int(alive.sum()) <= 0.75 * len(rows) and hasattr(cache, "batch_select_indices"):
            # Finished rows leave the batch and the cache: later steps only compute rows still decoding.
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, attention_mask, position_ids = rows[keep], tokens[keep], attention_mask[keep], position_ids[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position_ids = position_ids + 1
        logits, cache = _next_logits(model, tokens[:, None], attention_mask, position_ids, cache)
    cut = [cut_at_eos(tokens, eos)[0] for tokens in responses]
    return cut, [row[:len(tokens)] if with_logprobs else None for row, tokens in zip(logprobs, cut)]


@contextmanager
def _decoding_attention(model):
    """sdpa while decoding from a KV cache, whatever the model trains with: eager attention copies the grouped
    K/V heads of the whole cache at every step (embedded model: 3.1 s per rollout of 32 x 32 tokens, against
    2.6 s with sdpa). Sampling is not scored, so the kernels need not match those of scoring."""
    current = getattr(model.config, "_attn_implementation", None)
    switch = current == "eager" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


def sample_responses(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, batch_size: int = 32, progress: bool = False,
                     with_logprobs: bool = False, precision: str = "no", seeds: list[int] | None = None
                     ) -> list[Sample]:
    """One sampled response per prompt (repeat a prompt in `prompts` to get several); `with_logprobs` also
    keeps each token's log-prob from the sampling pass in `Sample.logprobs`. With `precision="bf16"` the
    model samples in plain bf16 (see models/precision.bf16_weights), else in whatever autocast is active.
    `seeds` (one per prompt, see `sample_seeds`) give each sample its own random stream; without them the
    global RNG draws for the whole batch."""
    from tqdm.auto import tqdm

    eos = eos_token_ids(model, tokenizer)
    device = module_device(model)  # prompts go where the model is
    was_training = model.training
    model.eval()
    samples = []
    starts = range(0, len(prompts), batch_size)
    # A LoRA role (models/roles.py) samples through its shared base: in fp32 with its adapter merged into the
    # weights for the rollout (one matmul per layer); under bf16 every weight of that base goes to bf16, and the
    # adapter stays apart, since its small delta would round away in a bf16 weight (lora.merged_weights).
    merged = model.merged() if isinstance(model, Role) and precision == "no" else contextlib.nullcontext(model)
    weights = bf16_weights(getattr(model, "shared_base", model)) if precision == "bf16" else contextlib.nullcontext()
    with _decoding_attention(model), merged as sampler, weights:
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
            chunk = prompts[start:start + batch_size]
            batch = to_device(collate_prompts(chunk, tokenizer.pad_token_id), device)
            uniforms = None if seeds is None else \
                sample_uniforms(seeds[start:start + batch_size], max_new_tokens).to(device)  # (b, T)
            responses, logprobs = _decode(sampler, batch, max_new_tokens, temperature, top_p, eos, with_logprobs,
                                          uniforms)
            for prompt, response, logprob in zip(chunk, responses, logprobs):
                samples.append(Sample(prompt, response, bool(response) and response[-1] in eos, logprob))
    model.train(was_training)
    return samples
