"""Advantage estimation and reward shaping for online RL.

Per-token tensors are [B, T] over response positions, right-padded, with `response_mask`
True on the response's tokens (a contiguous prefix of each row).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rlhf.kl import KLEstimator, kl_estimate
from rlhf.ops import masked_mean, masked_whiten

#: What GRPO divides the centred scores by (ppo.scale_rewards).
ScaleRewards = Literal["group", "batch", "none"]


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last counted token of each row ([B]); -1 for an empty response."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    return torch.where(response_mask.bool(), positions, -1).max(dim=1).values


def kl_shaped_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β KL_t, plus the sequence score on the last response token
    (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020, eq. 1). Returns (rewards, kl), both
    [B, T] and zero outside the mask. Rows with an empty response get no score.
    """
    mask = response_mask.bool()
    kl = kl_estimate(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += scores.float()[rows]
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016, eqs. 11-16.

    δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}, with V and A zero past the end of the
    response. Steps run over the mask's positions only: in a multi-turn episode the
    environment's tokens between two turns are not actions, so t+1 is the next turn's first
    token (its value and advantage pass across the gap). Returns (advantages, returns =
    advantages + values), zero outside the mask.
    """
    mask = response_mask.to(torch.float32)
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        on = m > 0
        next_adv = torch.where(on, adv, next_adv)
        next_value = torch.where(on, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def discounted_returns(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """G_t = Σ_{k>=t} γ^{k-t} r_k over the response, zero outside the mask."""
    zeros = torch.zeros_like(rewards, dtype=torch.float32)
    returns, _ = gae(rewards, zeros, response_mask, gamma, 1.0)
    return returns


#: Added to the std that GRPO divides by (as TRL's GRPOTrainer): bounds the advantages of a
#: group whose scores differ by rounding only.
GROUP_STD_EPS = 1e-4


def _group_view(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N × G] float64 view: group statistics in float32 round (0.7 eight times has a float32
    mean of 0.70000005), and the rounding, divided by a tiny std, became whole advantages."""
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of {group_size}")
    return scores.double().view(-1, group_size)


def _zero_unanimous(groups: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Exactly 0 for every sample of a group whose scores are all equal, whatever the values
    (such a group says nothing about which response is better), as float32 [N·G]."""
    unanimous = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return advantages.masked_fill(unanimous, 0.0).float().reshape(-1)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = GROUP_STD_EPS
) -> torch.Tensor:
    """GRPO outcome advantages, Shao et al. 2024, §4.1.2: (r - mean_group) / std_group.

    Scores are [N × G] with each prompt's G samples adjacent; statistics in float64, and a
    group of equal scores gets exactly 0. scale: "group" divides by the group's unbiased std
    (as torch.std) + eps; "batch" by the std of all the batch's scores (TRL's
    scale_rewards="batch"); "none" only centres (Dr. GRPO, Liu et al. 2025, §3.1).
    """
    groups = _group_view(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group" and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and groups.numel() > 1:
        centred = centred / (groups.std() + eps)
    return _zero_unanimous(groups, centred)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO, Ahmadian et al. 2024, eq. 6: r_i - 1/(G-1) Σ_{j≠i} r_j (float64; a group of equal
    scores gets exactly 0)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _group_view(scores, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return _zero_unanimous(groups, groups - others)


def reinforce_pp_advantages(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    group_size: int = 1,
    gamma: float = 1.0,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """REINFORCE++, Hu 2025, §3: token-level KL-shaped rewards, discounted returns, then
    whitening over the whole batch. With group_size > 1 the score is first centred on its
    group's mean (the "REINFORCE++-baseline" variant).
    """
    if group_size > 1:
        scores = grpo_advantages(scores, group_size, scale="none")
    rewards, _ = kl_shaped_rewards(scores, logps, ref_logps, response_mask, kl_coef, estimator)
    returns = discounted_returns(rewards, response_mask, gamma)
    return masked_whiten(returns, response_mask.bool())


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level advantages [B] as per-token advantages [B, T] (zero outside the mask)."""
    return advantages.float().unsqueeze(1) * response_mask.to(torch.float32)


class RunningMeanStd:
    """Running mean and variance of scalar rewards (Chan et al. 1979 parallel update).

    Used to normalise rewards across steps; its state goes into checkpoints.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = (
            float(state["mean"]),
            float(state["var"]),
            int(state["count"]),
        )


def shape_scores(
    scores: torch.Tensor,
    *,
    baseline: float = 0.0,
    normalizer: RunningMeanStd | None = None,
    clip: float | None = None,
    has_eos: torch.Tensor | None = None,
    missing_eos_penalty: float | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Sequence-score shaping applied before KL shaping, in this order:
    1. a penalty subtracted from responses that ended without EOS (truncated);
    2. a constant baseline subtracted (the classic "reward baseline" of the PPO recipes);
    3. running normalisation (the normaliser is updated with this batch first, then applied);
    4. clipping to [-clip, clip].
    """
    scores = scores.float().clone()
    if missing_eos_penalty is not None and has_eos is not None:
        scores = scores - missing_eos_penalty * (~has_eos.bool()).float()
    scores = scores - baseline
    if normalizer is not None:
        normalizer.update(scores)
        scores = (scores - normalizer.mean) / (normalizer.std + eps)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward: 0 up to
    max_length - buffer tokens, then falling linearly to -penalty at max_length (and below it
    beyond). lengths [B] -> [B] float32."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in [1, {max_length}], got {buffer}")
    free = max_length - buffer
    return ((free - lengths.float()) / buffer).clamp(min=-1.0, max=0.0) * penalty


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the counted tokens (1 = perfect critic, <= 0 = useless)."""
    mask = response_mask.bool()
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1 - var_residual / var_returns.clamp(min=1e-8)
