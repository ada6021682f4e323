"""Collators: lists of features -> typed batches, padded to the longest row of the batch.

Training batches are right-padded; prompt batches for generation are left-padded so that every
prompt ends at the same position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.data.tokenize import (
    ClassificationFeatures,
    PreferenceFeatures,
    PromptFeatures,
    SFTFeatures,
    UnpairedFeatures,
)
from rlhf.types import ClassificationBatch, PreferenceBatch, PromptBatch, SFTBatch, UnpairedBatch


def pad(
    rows: Sequence[Sequence], value, left: bool = False, dtype=torch.long, multiple_of: int = 1
) -> torch.Tensor:
    """Stack variable-length rows into [B, T], T = longest row rounded up to `multiple_of`."""
    width = max((len(r) for r in rows), default=0)
    width = -(-width // multiple_of) * multiple_of
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            t = torch.as_tensor(list(r), dtype=dtype)
            if left:
                out[i, width - len(r) :] = t
            else:
                out[i, : len(r)] = t
    return out


def _sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int):
    """Right-padded prompt+response rows with attention and response masks."""
    ids = [p + r for p, r in zip(prompts, responses, strict=True)]
    masks = [[False] * len(p) + [True] * len(r) for p, r in zip(prompts, responses, strict=True)]
    input_ids = pad(ids, pad_id)
    attention = pad([[True] * len(x) for x in ids], False, dtype=torch.bool)
    return input_ids, attention, pad(masks, False, dtype=torch.bool)


class PreferenceCollator:
    """Chosen rows then rejected rows in one batch (one forward pass for both)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[PreferenceFeatures]) -> PreferenceBatch:
        prompts = [f.prompt_ids for f in features] * 2
        responses = [f.chosen_ids for f in features] + [f.rejected_ids for f in features]
        input_ids, attention, response = _sequences(prompts, responses, self.pad_id)
        index = _index(features)
        return PreferenceBatch(input_ids, attention, response, index)


class SFTCollator:
    """Pads, or with `pack_length` packs several examples per row (first-fit decreasing)."""

    def __init__(self, pad_id: int, pack_length: int | None = None):
        self.pad_id, self.pack_length = pad_id, pack_length

    def __call__(self, features: Sequence[SFTFeatures]) -> SFTBatch:
        if self.pack_length:
            return self._packed(features)
        input_ids = pad([f.input_ids for f in features], self.pad_id)
        attention = pad([[True] * len(f.input_ids) for f in features], False, dtype=torch.bool)
        loss = pad([f.loss_mask for f in features], False, dtype=torch.bool)
        return SFTBatch(input_ids, attention, loss, _index(features))

    def _packed(self, features: Sequence[SFTFeatures]) -> SFTBatch:
        bins = pack_bins([len(f.input_ids) for f in features], self.pack_length)
        ids, loss, positions = [], [], []
        for members in bins:
            ids.append([t for i in members for t in features[i].input_ids])
            loss.append([m for i in members for m in features[i].loss_mask])
            positions.append([p for i in members for p in range(len(features[i].input_ids))])
        attention = pad([[True] * len(r) for r in ids], False, dtype=torch.bool)
        # Padding gets positions 0, 1, ... of its own, so it forms a separate "example".
        width = max(len(r) for r in ids)
        positions = [p + list(range(width - len(p))) for p in positions]
        loss = pad(loss, False, dtype=torch.bool)
        return SFTBatch(pad(ids, self.pad_id), attention, loss, _index(features), pad(positions, 0))


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so that each group's lengths sum to <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(
                f"example of {lengths[i]} tokens does not fit a packed row of {capacity}"
            )
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


class PromptCollator:
    """Left-padded prompts for generation."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[PromptFeatures]) -> PromptBatch:
        ids = [f.prompt_ids for f in features]
        attention = pad([[True] * len(x) for x in ids], False, left=True, dtype=torch.bool)
        index = _index(features)
        rows = tuple({**f.fields, "prompt": f.prompt} for f in features)
        return PromptBatch(pad(ids, self.pad_id, left=True), attention, index, rows)


class UnpairedCollator:
    """KTO batches; the KL rows pair each prompt with the next row's completion (Ethayarajh
    et al. 2024 §4.2: mismatched pairs estimate the reference point z0)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[UnpairedFeatures]) -> UnpairedBatch:
        prompts = [f.prompt_ids for f in features]
        completions = [f.completion_ids for f in features]
        shifted = completions[1:] + completions[:1]
        ids, attention, response = _sequences(prompts, completions, self.pad_id)
        kl_ids, kl_attention, kl_response = _sequences(prompts, shifted, self.pad_id)
        desirable = torch.tensor([f.desirable for f in features], dtype=torch.bool)
        index = _index(features)
        return UnpairedBatch(
            ids, attention, response, desirable, kl_ids, kl_attention, kl_response, index
        )


class ClassificationCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[ClassificationFeatures]) -> ClassificationBatch:
        ids = [f.input_ids for f in features]
        attention = pad([[True] * len(x) for x in ids], False, dtype=torch.bool)
        labels = torch.tensor([f.label for f in features], dtype=torch.long)
        return ClassificationBatch(pad(ids, self.pad_id), attention, labels, _index(features))


def _index(features) -> torch.Tensor:
    return torch.tensor([f.index for f in features], dtype=torch.long)


def make_collator(fmt: str, pad_id: int, pack_length: int | None = None):
    """The collator for a row format (chosen once at setup)."""
    if fmt == "sft":
        return SFTCollator(pad_id, pack_length)
    return {
        "preference": PreferenceCollator,
        "prompt": PromptCollator,
        "unpaired": UnpairedCollator,
        "classification": ClassificationCollator,
    }[fmt](pad_id)
