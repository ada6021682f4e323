"""From scored rollouts to PPO experience: reward shaping, KL-in-reward, advantages and
returns for every estimator (GAE with a critic; GRPO, RLOO, REINFORCE++ without).

Per-token tensors are [B, T-1], aligned with next-token log-probs; `action_mask` marks the
response tokens. Rows of one prompt's n samples are adjacent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlhf.advantages import (
    RunningMeanStd,
    discounted_returns,
    explained_variance,
    gae,
    grpo_advantages,
    kl_shaped_rewards,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    shape_scores,
)
from rlhf.config import PPOConfig, RunConfig
from rlhf.ops import masked_mean, masked_whiten


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor
    returns: torch.Tensor
    metrics: dict[str, float]


#: What an estimator returns: (advantages, returns, the per-token KL it shaped with).
Estimate = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _gae(p: PPOConfig, n, shaped, logps, ref, mask, values, kl_coef) -> Estimate:
    if values is None:
        raise ValueError("ppo.estimator=gae needs critic values")
    rewards, kl = kl_shaped_rewards(shaped, logps, ref, mask, kl_coef, p.kl_estimator)
    adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
    return adv, returns, kl


def _outcome(baseline, p: PPOConfig, n, shaped, logps, ref, mask, values, kl_coef) -> Estimate:
    """Group baselines applied to sequence scores before KL shaping (critic-free PPO)."""
    rewards, kl = kl_shaped_rewards(baseline(shaped, n), logps, ref, mask, kl_coef, p.kl_estimator)
    adv = discounted_returns(rewards, mask, p.gamma)
    return adv, adv, kl


def _grpo(p: PPOConfig, *args) -> Estimate:
    return _outcome(partial(grpo_advantages, scale=p.scale_rewards), p, *args)


def _rloo(p: PPOConfig, *args) -> Estimate:
    return _outcome(rloo_advantages, p, *args)


def _reinforce_pp(p: PPOConfig, n, shaped, logps, ref, mask, values, kl_coef) -> Estimate:
    adv = reinforce_pp_advantages(
        shaped, logps, ref, mask, kl_coef, group_size=n, gamma=p.gamma, estimator=p.kl_estimator
    )
    _, kl = kl_shaped_rewards(shaped, logps, ref, mask, kl_coef, p.kl_estimator)
    return adv, adv, kl


#: ppo.estimator -> fn(ppo config, group size, shaped scores, log-probs, reference log-probs,
#: mask, values, kl_coef) -> Estimate. Looked up once at setup (`estimator_for`).
ESTIMATORS = {"gae": _gae, "grpo": _grpo, "rloo": _rloo, "reinforce_pp": _reinforce_pp}


def estimator_for(p: PPOConfig):
    """The advantage estimator ppo.estimator names."""
    return ESTIMATORS[p.estimator]


def whitens(p: PPOConfig) -> bool:
    """Whether the advantages are whitened over the batch after the estimator (see
    ppo.whiten_advantages; REINFORCE++ whitens inside its estimator)."""
    if p.estimator == "reinforce_pp":
        return False
    return p.estimator == "gae" if p.whiten_advantages is None else p.whiten_advantages


def compute_advantages(
    cfg: RunConfig,
    scores: torch.Tensor,
    action_mask: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    values: torch.Tensor | None,
    has_eos: torch.Tensor,
    kl_coef: float,
    normalizer: RunningMeanStd | None,
    estimator=None,
) -> Advantages:
    """Shaped scores, then the estimator's advantages and returns (`estimator`: what
    `estimator_for(cfg.ppo)` returns, looked up once by the caller; None looks it up here)."""
    p, rc = cfg.ppo, cfg.roles.reward
    n = cfg.roles.rollout.n_samples_per_prompt
    mask = action_mask.bool()
    extra = {}
    raw = scores
    if p.overlong_buffer is not None:
        limit = cfg.roles.rollout.max_new_tokens
        buffer = limit // 5 if p.overlong_buffer == "auto" else p.overlong_buffer
        penalty = overlong_penalty(mask.sum(-1), limit, buffer, p.overlong_penalty)
        scores = scores.float() + penalty
        extra["reward/overlong_penalty"] = penalty.mean().item()
    shaped = shape_scores(
        scores,
        baseline=rc.baseline,
        normalizer=normalizer,
        clip=rc.clip,
        has_eos=has_eos,
        missing_eos_penalty=rc.missing_eos_penalty,
    )
    ref = ref_logps if ref_logps is not None else logps  # no reference: zero KL
    estimate = estimator or estimator_for(p)
    adv, returns, kl = estimate(p, n, shaped, logps, ref, mask, values, kl_coef)
    if whitens(p):
        adv = masked_whiten(adv, mask)
    metrics = {
        **extra,
        "reward/mean": raw.float().mean().item(),
        "reward/std": raw.float().std().item() if raw.numel() > 1 else 0.0,
        "reward/shaped_mean": shaped.mean().item(),
        "kl/seq": (kl * mask).sum(-1).mean().item(),
        "kl/coef": kl_coef,
        "response/length": mask.sum(-1).float().mean().item(),
        "response/eos_fraction": has_eos.float().mean().item(),
        "advantages/mean": masked_mean(adv, mask).item(),
    }
    if values is not None:
        metrics["value/explained_variance"] = explained_variance(values, returns, mask).item()
    return Advantages(adv * mask, returns * mask, metrics)
