"""Tensor ops shared by every loss: log-probs from logits, masked reductions, whitening.

All reductions take a `mask` (True/1 = the position counts). Reductions over an empty mask
return 0 instead of NaN, so a batch with an all-masked row never poisons a step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal[
    "token_mean",
    "seq_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
]


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] per position, in float32 whatever the input dtype.

    logits [..., V], labels [...] -> [...]. Computed as gather - logsumexp so that the full
    [..., V] log-softmax is never materialised (it is the largest tensor of a step).
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of input_ids[:, 1:] under logits[:, :-1]: [B, T] -> [B, T-1]."""
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: [..., V] -> [...]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    # A -inf logit (a masked-out vocabulary entry) has p = 0 and contributes 0, not 0 * -inf.
    return -torch.where(logp.isneginf(), 0.0, logp.exp() * logp).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is set (over all positions when dim is None). Masked-out positions
    are selected away, not multiplied by 0, so a NaN or inf there (padding) cannot leak in."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    # Accumulate in at least float32: a bf16 sum of a few hundred tokens is already off.
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.sum(dtype=acc) if dim is None else x.sum(dim, dtype=acc)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is set; 0 where nothing is set (never NaN). The count is taken in
    float32: in bf16, integers above 256 are not exact."""
    count = mask.float().sum() if dim is None else mask.float().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions (Bessel-corrected when unbiased and n > 1)."""
    mean = masked_mean(x, mask)
    n = mask.float().sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation = "token_mean",
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token_mean:               sum over every counted token / number of counted tokens (long
                              responses weigh more; DAPO, Yu et al. 2025, eq. 8).
    seq_mean_token_mean:      mean over sequences of each sequence's token mean (PPO/GRPO paper
                              form, Shao et al. 2024, eq. 3); `seq_mean` is the same.
    seq_mean_token_sum:       mean over sequences of each sequence's token sum.
    seq_mean_token_sum_norm:  sum over every counted token / (B × norm_length), a constant
                              normaliser (Dr. GRPO, Liu et al. 2025, eq. 5: no length bias).
    Sequences with no counted token are left out of the seq_mean_* means; the _norm mode counts
    every row (its normaliser does not depend on the batch's masks).
    """
    if mode == "token_mean":
        return masked_mean(loss, mask)
    if mode == "seq_mean_token_sum_norm":
        if not norm_length:
            raise ValueError("aggregation seq_mean_token_sum_norm needs norm_length (max tokens)")
        return masked_sum(loss, mask) / (loss.shape[0] * norm_length)
    has_tokens = mask.any(dim=-1)
    per_seq = masked_sum(loss, mask, dim=-1)
    if mode in ("seq_mean", "seq_mean_token_mean"):
        per_seq = per_seq / mask.float().sum(-1).clamp(min=1)
    elif mode != "seq_mean_token_sum":
        raise ValueError(
            f"unknown aggregation {mode!r}: use token_mean, seq_mean_token_mean (seq_mean), "
            "seq_mean_token_sum or seq_mean_token_sum_norm"
        )
    return masked_mean(per_seq, has_tokens)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = x.clamp(max=-1e-30) if x.dtype == torch.float64 else x.clamp(max=-1e-7)
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )
