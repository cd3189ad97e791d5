"""Pure tensor math for RLHF: masked reductions, token log-probs, and losses.

Everything here is a function of tensors, masks and scalars; nothing imports the rest of rlhfkit, touches
a model, does I/O or talks to other processes.
"""

from .bradley_terry import bradley_terry_loss, pairwise_accuracy
from .logprobs import entropy_from_logits, logprobs_from_logits, shift_for_causal_lm
from .masked import masked_mean, masked_sum, masked_var, masked_whiten
from .sft_loss import completion_nll_loss

__all__ = [
    "bradley_terry_loss",
    "completion_nll_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_accuracy",
    "shift_for_causal_lm",
]
