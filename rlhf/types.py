"""Batch dataclasses passed between the data pipeline, the losses and the actors.

Shapes: B = batch rows, T = padded sequence length. Masks are bool (True = counts).
`response_mask` / `loss_mask` are aligned with `input_ids` (position t marks token t as a
response token); the ops shift them when pairing with next-token log-probs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class _Batch:
    def to(self, device: torch.device | str):
        """The same batch with every tensor moved to `device`."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class SFTBatch(_Batch):
    """input_ids, attention_mask, loss_mask: [B, T]; index: dataset indices of the examples in
    the batch (more than B when packed). When examples are packed, position_ids
    [B, T] restart at 0 for each example and the model gets them instead of the attention mask:
    transformers then keeps attention inside each example (for sdpa, eager and flash-attn)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    index: torch.Tensor
    position_ids: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """Forward kwargs. Packed rows pass position_ids and no mask, and no KV cache: with a
        cache, transformers skips the packed-sequence detection and attends across examples."""
        if self.position_ids is not None:
            return {
                "input_ids": self.input_ids,
                "position_ids": self.position_ids,
                "use_cache": False,
            }
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }


@dataclass(frozen=True)
class PreferenceBatch(_Batch):
    """Chosen rows then rejected rows, concatenated: input_ids, attention_mask,
    response_mask: [2B, T]; rows [0, B) are chosen, [B, 2B) rejected, pair i is (i, B + i).
    `index` [B] is each pair's dataset index (for cached reference log-probs)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    index: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class UnpairedBatch(_Batch):
    """KTO: input_ids, attention_mask, response_mask: [B, T]; desirable [B] bool; the `kl_*`
    tensors [B, T'] hold mismatched (prompt_i, completion_{i+1}) pairs for the KL baseline."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    desirable: torch.Tensor
    kl_input_ids: torch.Tensor
    kl_attention_mask: torch.Tensor
    kl_response_mask: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class ClassificationBatch(_Batch):
    """input_ids, attention_mask: [B, T]; labels [B] (int class ids); index [B]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class PromptBatch(_Batch):
    """Left-padded prompts for generation: input_ids, attention_mask [B, T]; index [B]; rows:
    each prompt's row, {"prompt": its text or messages, **its other fields} (what a
    multi-turn environment starts from)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    rows: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Experience(_Batch):
    """One PPO micro-batch. input_ids, attention_mask: [B, T] (left-padded prompt, then the
    right-padded response). Every per-token tensor is [B, T-1], aligned with next-token
    log-probs (column t scores token t+1): action_mask marks response tokens; old_logps,
    advantages, returns and old_values are 0 elsewhere. index [B]: the prompt's dataset index.
    old_logps is None when each row is used by exactly one update, from the weights that
    sampled it: the update's own (detached) log-probs are then the old ones (ratio 1).
    rollout_logps: the engine's log-probs of the sampled tokens, given when old_logps is None
    so that the update measures the engine-trainer gap (rlhf.kl.logp_gap)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logps: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor
    old_values: torch.Tensor
    index: torch.Tensor
    rollout_logps: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> Experience:
        """The sub-batch of rows `idx`."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name)[idx]
                for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None
            },
        )
