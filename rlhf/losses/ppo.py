"""PPO losses: clipped policy surrogate (with optional dual clip), clipped value loss, entropy.

All per-token tensors are [B, T] over response positions, with `response_mask` marking the
tokens that count; the reduction is chosen by `aggregation` (see rlhf.ops.aggregate).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.kl import KLEstimator, kl_estimate
from rlhf.ops import Aggregation, aggregate, masked_mean

Metrics = dict[str, torch.Tensor]


#: ppo.policy_loss: the surrogate a policy update minimises.
PolicyLoss = Literal["ppo", "gspo", "cispo"]


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kind: PolicyLoss = "ppo",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    norm_length: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The policy surrogate as a loss to minimise, per token then aggregated.

    ppo: the clipped surrogate, Schulman et al. 2017 eq. 7: max(-A ρ, -A clip(ρ, 1-ε, 1+ε_high)),
    ρ = exp(log π - log π_old). `clip_eps_high` is DAPO's clip-higher (Yu et al. 2025, eq. 10;
    defaults to ε). `dual_clip` = c > 1 bounds the loss of negative advantages by -c A (Ye et
    al. 2020, eq. 5).

    gspo: the same clip on the sequence's length-normalised ratio s_i = exp(mean_t log ρ_t)
    (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 7), written in its GSPO-token
    form (eqs. 13-14): s_i,t = sg[s_i] · π_t / sg[π_t] has the value s_i at every token and the
    gradient s_i ∇log π_t, so with seq_mean_token_mean aggregation and sequence-level advantages
    it is GSPO exactly.

    cispo: REINFORCE with a clipped, stop-gradient IS weight, -sg(clip(ρ, 1-ε, 1+ε_high)) A log π
    (MiniMax-M1, Chen et al. 2025, eq. 4): no token's gradient is dropped by the clip, only
    its weight bounded (ε >= 1 leaves no lower bound, as the paper).

    `is_weights` (constants, see off_policy_weights) multiply each token's loss before the
    aggregation; `norm_length` is seq_mean_token_sum_norm's constant.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = response_mask.bool()
    logps = logps.float()
    log_ratio = (logps - old_logps.float()).clamp(-20.0, 20.0)
    advantages = advantages.float()
    metrics: Metrics = {
        # k2-style estimate of KL(π_old || π) over the sampled tokens.
        "policy/approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
        "policy/ratio": masked_mean(torch.exp(log_ratio.detach()), mask),
    }
    if kind == "gspo":
        seq_log = masked_mean(log_ratio, mask, dim=-1).detach()  # [B]: log s_i
        metrics["policy/seq_ratio"] = masked_mean(torch.exp(seq_log), mask.any(-1))
        log_ratio = seq_log.unsqueeze(1) + logps - logps.detach()
    ratio = torch.exp(log_ratio)
    if kind == "cispo":
        weight = ratio.detach().clamp(1 - clip_eps, 1 + high)
        loss = -weight * advantages * logps
        metrics["policy/clipfrac"] = masked_mean((weight != ratio.detach()).float(), mask)
    elif kind in ("ppo", "gspo"):
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + high)
        loss = torch.maximum(unclipped, clipped)
        metrics["policy/clipfrac"] = masked_mean((clipped > unclipped).float(), mask)
    else:
        raise ValueError(f"unknown policy loss {kind!r}: use ppo, gspo or cispo")
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        if kind == "cispo":
            raise ValueError("dual_clip bounds the clipped surrogate: not with cispo")
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        metrics["policy/dual_clipfrac"] = masked_mean(dual.float(), mask)
    if is_weights is not None:
        loss = loss * is_weights.detach().float()
    loss = aggregate(loss, mask, aggregation, norm_length)
    metrics["policy/loss"] = loss.detach()
    return loss, metrics


def off_policy_weights(
    old_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str,
    cap: float = 2.0,
) -> tuple[torch.Tensor | None, torch.Tensor, Metrics]:
    """Per-token correction for sampling by a behaviour policy π_b (the rollout engine) whose
    log-probs differ from the trainer's π_old at the same weights (vLLM kernels, bf16, a stale
    engine). w = π_old / π_b per token, a constant (no gradient flows through it).

    tis: truncated importance sampling, each token's policy loss weighted by min(w, C) (Yao et
    al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; Ionides
    2008 for the truncation). mis: masked importance sampling, tokens with w outside [1/C, C]
    leave the loss, the rest keep weight 1 (veRL's token-level "mask" mode).

    Returns (the weights, or None for mis; the mask of the tokens that stay in the loss;
    metrics: rollout/is_weight_mean and rollout/is_weight_max of w over the response tokens,
    and rollout/is_capped_frac (tis) or rollout/is_masked_frac (mis)).
    """
    if cap <= 1.0:
        raise ValueError(f"off_policy_cap must be > 1, got {cap}")
    mask = response_mask.bool()
    log_w = (old_logps.detach().float() - behaviour_logps.detach().float()).clamp(-20.0, 20.0)
    w = torch.where(mask, torch.exp(log_w), 1.0)
    metrics: Metrics = {
        "rollout/is_weight_mean": masked_mean(w, mask),
        "rollout/is_weight_max": w[mask].max() if bool(mask.any()) else torch.zeros(()),
    }
    if mode == "tis":
        metrics["rollout/is_capped_frac"] = masked_mean((w > cap).float(), mask)
        return w.clamp(max=cap), mask, metrics
    if mode == "mis":
        keep = mask & (w >= 1.0 / cap) & (w <= cap)
        metrics["rollout/is_masked_frac"] = masked_mean((mask & ~keep).float(), mask)
        return None, keep, metrics
    raise ValueError(f"unknown off-policy correction {mode!r}: use tis or mis")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss, 0.5 max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±c)
    (the PPO2 baseline implementation; Huang et al. 2022, "37 implementation details" #9).
    `clip_range=None` gives the plain squared error 0.5 (V - R)².
    """
    values, returns = values.float(), returns.float()
    mask = response_mask.bool()
    unclipped = (values - returns) ** 2
    metrics: Metrics = {}
    if clip_range is None:
        per_token = unclipped
    else:
        old_values = old_values.float()
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        metrics["value/clipfrac"] = masked_mean((clipped > unclipped).float(), mask)
    loss = 0.5 * aggregate(per_token, mask, aggregation, norm_length)
    metrics["value/loss"] = loss.detach()
    metrics["value/mean"] = masked_mean(values.detach(), mask)
    return loss, metrics


def kl_penalty_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    coef: float,
    estimator: KLEstimator = "k3",
    aggregation: Aggregation = "token_mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """β × the aggregated per-token KL(π || π_ref) estimate, a loss term (GRPO, Shao et al. 2024,
    eq. 3 with k3, Schulman 2020). Differentiable in `logps`; the reference is a constant.

    Metrics: policy/kl (token mean of the estimate) and policy/kl_seq (mean over rows of each
    row's sum, the quantity the adaptive KL controller tracks).
    """
    mask = response_mask.bool()
    kl = torch.where(mask, kl_estimate(logps, ref_logps.detach(), estimator), 0.0)
    metrics: Metrics = {
        "policy/kl": masked_mean(kl.detach(), mask),
        "policy/kl_seq": kl.detach().sum(-1).mean(),
    }
    return coef * aggregate(kl, mask, aggregation, norm_length), metrics


def entropy_loss(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    coef: float,
    aggregation: Aggregation = "token_mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Entropy bonus as a loss term: -coef × aggregated entropy (Schulman 2017 eq. 9, c2 S)."""
    mean_entropy = aggregate(entropy.float(), response_mask.bool(), aggregation, norm_length)
    return -coef * mean_entropy, {"policy/entropy": mean_entropy.detach()}
