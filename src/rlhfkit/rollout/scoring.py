"""Scoring a rollout: response log-probs (policy, reference), critic values and reward-model scores.

All per-token outputs are (B, R), aligned with `RolloutBatch.response_mask` (see rollout/batch.py).
"""

from __future__ import annotations

import torch

from rlhfkit.core import kl as kl_math
from rlhfkit.core.head_logprobs import head_logprobs
from rlhfkit.core.kl import exact_token_kl
from rlhfkit.core.logprobs import entropy_from_logits, logprobs_from_logits
from rlhfkit.data.collate import left_pad
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.models.reward_model import score_sequences
from rlhfkit.rollout.batch import RolloutBatch
from rlhfkit.runtime.device import module_device, to_device


# Config fields of models whose logits are more than `lm_head(hidden)`; those take the model's own path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def tail_logits(model, input_ids, attention_mask, position_ids, R: int) -> torch.Tensor:
    """fp32 logits that predict the last R tokens of each (left-padded) row: (B, R, V)."""
    if has_own_logit_path(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=R + 1, use_cache=False)
        return out.logits[:, :-1].float()
    return lm_head_logits(model, _tail_hidden(model, input_ids, attention_mask, position_ids, R))


def _tail_hidden(model, input_ids, attention_mask, position_ids, R: int) -> torch.Tensor:
    """The trunk's last hidden states before each of the last R tokens: (B, R, H)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    return hidden[:, -(R + 1):-1]  # hidden columns T-R-1 .. T-2


def tail_logprobs(model, input_ids, attention_mask, position_ids, labels: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(label) for the last R = labels.shape[1] tokens of each row, (B, R) float32, and the entropy (B, R)
    of each of those positions if asked; both differentiable.

    Only the R hidden states before those tokens go through the LM head, which spares a (B, P, V) tensor of
    prompt logits; and the head is fused with the log-softmax (core/head_logprobs.py), which spares the (B, R, V)
    logits. The head runs in fp32 even under bf16 autocast: bf16 logits carry ~3 significant digits, and the
    PPO ratio exp(logp_new - logp_old) of two bf16 computations of the same policy (one batched at rollout, one
    per micro-batch) would differ from 1 by several percent. With `mask` (B, R), only its positions go through
    the head (padding after short responses costs nothing) and the others are 0.
    """
    R = labels.shape[1]
    where = mask.bool().nonzero(as_tuple=True) if mask is not None else (slice(None),)  # (N,) positions or all

    def spread(values):  # (N,) -> (B, R), zeros off the mask; differentiable
        return values if mask is None else values.new_zeros(labels.shape).index_put(where, values)

    if has_own_logit_path(model):
        logits = tail_logits(model, input_ids, attention_mask, position_ids, R)[where]
        entropy = entropy_from_logits(logits, temperature) if with_entropy else None
        logprobs = logprobs_from_logits(logits, labels[where], temperature)
    else:
        head = model.get_output_embeddings()
        hidden = _tail_hidden(model, input_ids, attention_mask, position_ids, R)[where]  # (B, R, H) or (N, H)
        logprobs, entropy = head_logprobs(hidden, head.weight, labels[where], temperature,
                                          getattr(head, "bias", None), with_entropy)
    return spread(logprobs), spread(entropy) if with_entropy else None


def has_own_logit_path(model) -> bool:
    """True for models whose logits are more than `lm_head(hidden)` (soft-capping, scaling)."""
    return any(getattr(model.config, key, None) for key in _LOGIT_POSTPROCESSING)


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits (..., V) from hidden states (..., H): the LM head in fp32, also under autocast; only a head
    whose weights are bf16 (inside models/precision.bf16_weights, for sampling) runs in bf16, upcast after."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if head.weight.dtype == torch.bfloat16:
            return torch.nn.functional.linear(hidden.to(torch.bfloat16), head.weight, bias).float()
        bias = bias.float() if bias is not None else None
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(r_t | prompt, r_<t) at the sampling temperature: (B, R); and the entropy (B, R) if asked.
    Scoring must use the temperature the samples were drawn at, or the PPO ratio compares different
    distributions. Both are differentiable when grad is enabled, and 0 after the end of a response."""
    return tail_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.responses,
                         temperature, with_entropy, mask=batch.response_mask)


@torch.no_grad()
def response_logprobs_and_kl(policy, ref, batch: RolloutBatch,
                             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For evaluation (no grad): log pi(r_t), log pi_ref(r_t) and the exact KL(pi_t || pi_ref_t) over the whole
    vocabulary (core.kl.exact_token_kl) at each response position, all (B, R) float32 and 0 after a response ends.

    One trunk forward per model, as two `response_logprobs` calls would take; both LM heads then run in fp32 on
    one chunk of response positions at a time, and each chunk's two log-softmaxes give the sampled tokens'
    log-probs and the KL, so no (B, R, V) tensor is kept (the models whose logits are more than the head,
    `has_own_logit_path`, return them whole from their own forward)."""
    R = batch.responses.shape[1]
    mask = batch.response_mask.bool()
    where = mask.nonzero(as_tuple=True)
    labels = batch.responses[where]  # (N,)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids)

    def rows_source(model):  # a function: a slice of the N response positions -> model's fp32 logits there
        if has_own_logit_path(model):
            logits = tail_logits(model, *args, R)[where]
            return lambda rows: logits[rows]
        hidden = _tail_hidden(model, *args, R)[where]
        return lambda rows: lm_head_logits(model, hidden[rows])

    policy_rows, ref_rows = rows_source(policy), rows_source(ref)
    n = labels.shape[0]
    logp, logq, kl = (torch.zeros(n, dtype=torch.float32, device=labels.device) for _ in range(3))
    vocab = policy.get_output_embeddings().weight.shape[0]
    step = max(1, kl_math._CHUNK_ELEMENTS // max(vocab, 1))  # rows per chunk, as core.kl.exact_sequence_kl
    for start in range(0, n, step):
        rows = slice(start, start + step)
        with torch.autocast(device_type=labels.device.type, enabled=False):
            lp, lq = (torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
                      for logits in (policy_rows(rows).float(), ref_rows(rows).float()))
            if lp.shape[-1] != lq.shape[-1]:
                raise ValueError(f"policy and reference vocabularies differ ({lp.shape[-1]} and {lq.shape[-1]} "
                                 f"logits): no KL between them")
            index = labels[rows].unsqueeze(1)
            logp[rows] = lp.gather(1, index).squeeze(1)
            logq[rows] = lq.gather(1, index).squeeze(1)
            kl[rows] = exact_token_kl(lp, lq, logprobs=True)

    def spread(values):  # (N,) -> (B, R), zeros after each response
        return values.new_zeros(mask.shape).index_put(where, values)

    return spread(logp), spread(logq), spread(kl)


def response_values(critic, batch: RolloutBatch) -> torch.Tensor:
    """V(s_t) for each response token, read from the state before the token is chosen: (B, R)."""
    P, R = batch.prompt_width, batch.response_mask.shape[1]
    hidden = critic.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, use_cache=False).last_hidden_state
    return critic.score(hidden[:, P - 1:P + R - 1]).squeeze(-1).float()  # (B, R)


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a is tokenizer_b or (
        len(tokenizer_a) == len(tokenizer_b) and tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
        and getattr(tokenizer_a, "chat_template", None) == getattr(tokenizer_b, "chat_template", None))


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model.

    When the reward model shares the policy's tokenizer and chat template, the rollout's token ids are
    scored as they are. Otherwise the decoded text is re-tokenised with the reward model's own tokenizer
    (prompt rendered with its chat template, response followed by its EOS), as a reward model expects.
    """

    def __init__(self, model, tokenizer, policy_tokenizer, max_prompt_length: int, use_chat_template: bool = True,
                 system_prompt: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.reuse_ids = same_vocabulary(tokenizer, policy_tokenizer)
        self.max_prompt_length, self.use_chat_template = max_prompt_length, use_chat_template
        self.system_prompt = system_prompt

    @torch.no_grad()
    def __call__(self, batch: RolloutBatch, prompts: list, response_texts: list[str]) -> torch.Tensor:
        """(B,) scores; `prompts` are the prompt records' text/messages, used only when re-tokenising."""
        if self.reuse_ids:
            return score_sequences(self.model, batch.input_ids, batch.attention_mask, batch.position_ids)
        sequences = []
        for prompt, text, ended in zip(prompts, response_texts, batch.ended.tolist()):
            ids = tokenize_prompt(self.tokenizer, prompt, self.max_prompt_length, self.use_chat_template,
                                  self.system_prompt)
            ids += self.tokenizer(text, add_special_tokens=False)["input_ids"]
            # Only a finished response gets an end-of-turn: the reward model must see truncation as such.
            sequences.append(ids + [self.tokenizer.eos_token_id] if ended else ids)
        padded = to_device(left_pad(sequences, self.tokenizer.pad_token_id), module_device(self.model))
        return score_sequences(self.model, padded["input_ids"], padded["attention_mask"], padded["position_ids"])
