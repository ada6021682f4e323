"""ReferenceModel: the frozen reference policy. Log-probs only: no gradients, no optimizer
state. Its ranks are independent (data parallel without a process group)."""

from __future__ import annotations

import torch

from actors.base import RankInfo, Worker
from rlhf.models import load_model
from rlhf.objectives import RefLogps, reference_logps, token_logps
from rlhf.roles import ReferenceSpec


class ReferenceModel(Worker):
    def __init__(self, info: RankInfo, spec: ReferenceSpec):
        super().__init__(info)
        self.model = load_model(
            spec.model, "causal", trainable=False, device=self.device, precision=spec.precision
        )

    def perf_module(self):
        return self.model, self.model.dtype

    @torch.no_grad()
    def token_logps(
        self, sequences: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0
    ) -> list[torch.Tensor]:
        """Next-token log-probs [B, T-1] of (input_ids, attention_mask) pairs (online RL);
        columns before `start` (the prompt) are 0."""
        return [
            token_logps(self.model, ids.to(self.device), mask.to(self.device), start).cpu()
            for ids, mask in sequences
        ]

    per_token = token_logps

    @torch.no_grad()
    def logps(self, batches: list) -> list[RefLogps]:
        """Reference log-prob sums for each batch (on the CPU, for the object store)."""
        out = []
        for batch in batches:
            ref = reference_logps(self.model, batch.to(self.device))
            out.append(
                RefLogps(ref.logps.cpu(), None if ref.kl_logps is None else ref.kl_logps.cpu())
            )
        return out
