"""Pure tensor math for RLHF: masked reductions, token log-probs, and losses.

Everything here is a function of tensors, masks and scalars; nothing imports the rest of rlhfkit, touches
a model, does I/O or talks to other processes.
"""

from .bradley_terry import bradley_terry_loss, pairwise_accuracy
from .dpo import DPO_LOSSES, dpo_loss, implicit_rewards, sequence_logps
from .gae import gae_advantages, whiten_advantages
from .group_advantages import GROUP_ADVANTAGES, grpo_advantages, rloo_advantages
from .grpo_loss import grpo_policy_loss
from .kl import KL_ESTIMATORS, kl_penalty
from .kl_controller import KLController
from .logprobs import entropy_from_logits, logprobs_from_logits, shift_for_causal_lm
from .masked import masked_mean, masked_sum, masked_var, masked_whiten
from .ppo_loss import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    explained_variance,
    loss_units,
    ppo_policy_loss,
    ppo_value_loss,
)
from .reward_shaping import shape_rewards
from .sft_loss import completion_nll_loss

__all__ = [
    "DPO_LOSSES",
    "GROUP_ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "KLController",
    "aggregate_loss",
    "bradley_terry_loss",
    "completion_nll_loss",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "grpo_policy_loss",
    "implicit_rewards",
    "kl_penalty",
    "logprobs_from_logits",
    "loss_units",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_accuracy",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "sequence_logps",
    "shape_rewards",
    "shift_for_causal_lm",
    "whiten_advantages",
]
