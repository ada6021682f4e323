"""KL estimators between policy and reference, and the KL-coefficient controllers.

Estimators are per token, from log π (logps) and log π_ref (ref_logps) of the sampled
tokens (Schulman, "Approximating KL divergence", 2020), with r = π_ref / π:
  k1 = log π - log π_ref          unbiased, high variance, can be negative
  k2 = ½ (log r)²                 biased, low variance, >= 0
  k3 = (r - 1) - log r            unbiased, low variance, >= 0
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]

#: |log r| bound for k3: exp(20) ≈ 5e8 keeps k3 finite in float32 for any log-prob gap.
K3_LOG_RATIO_CLAMP = 20.0


def kl_estimate(
    logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate, float32, same shape as the inputs."""
    log_ratio = logps.float() - ref_logps.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_r = (-log_ratio).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),
    β_{t+1} = β_t (1 + K_β e_t) with K_β = n_steps / horizon.
    """

    def __init__(self, init_value: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = (
            float(state["value"]),
            float(state["target"]),
            int(state["horizon"]),
        )


def make_kl_controller(
    init_value: float, target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """Adaptive when a target KL is given, else fixed."""
    if target is None:
        return FixedKLController(init_value)
    return AdaptiveKLController(init_value, target, horizon)


#: The behaviour (rollout engine) vs trainer log-prob gap metrics, see logp_gap.
GAP_KEYS = ("rollout/logp_gap_mean", "rollout/logp_gap_max", "rollout/logp_gap_kl")


def logp_gap(
    logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the trainer's log-probs (`logps`) of the sampled tokens are from those of the
    engine that sampled them (`behaviour_logps`), over the tokens of `mask`: mean and max of
    |Δ|, and KL(π_behaviour || π_trainer) by k3 (the samples are the behaviour policy's).
    Zero when both compute the same numbers; a bf16 or vLLM engine makes it non-zero."""
    acting = mask.bool()
    if not bool(acting.any()):
        return dict.fromkeys(GAP_KEYS, 0.0)
    delta = (logps.double() - behaviour_logps.double())[acting]
    # Samples from the behaviour policy: KL(π_b || π) by k3 with r = π / π_b.
    k3 = kl_estimate(behaviour_logps[acting], logps[acting], "k3")
    values = (delta.abs().mean().item(), delta.abs().max().item(), k3.double().mean().item())
    return dict(zip(GAP_KEYS, values, strict=True))
