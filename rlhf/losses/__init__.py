"""Pure loss functions: each returns `(loss, metrics)` with metric keys `role/name`."""

from rlhf.losses.ppo import (
    entropy_loss,
    kl_penalty_loss,
    off_policy_weights,
    policy_loss,
    value_loss,
)
from rlhf.losses.preference import (
    LENGTH_NORMALISED,
    PAIRED_LOSSES,
    REFERENCE_FREE,
    kto_loss,
    orpo_loss,
    preference_loss,
)
from rlhf.losses.reward import bradley_terry_loss, classification_loss
from rlhf.losses.sft import sft_loss

__all__ = [
    "LENGTH_NORMALISED",
    "PAIRED_LOSSES",
    "REFERENCE_FREE",
    "bradley_terry_loss",
    "classification_loss",
    "entropy_loss",
    "kl_penalty_loss",
    "kto_loss",
    "off_policy_weights",
    "orpo_loss",
    "policy_loss",
    "preference_loss",
    "sft_loss",
    "value_loss",
]
