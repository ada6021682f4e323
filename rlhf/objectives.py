"""Training objectives: model forward on a typed batch -> (loss, metrics).

The bridge between the pure losses (rlhf.losses) and the trainers: each objective runs the
forward pass its algorithm needs and calls the loss. The policy trainer actor and the
`rlhf check` dry run both use these, chosen once at setup through OBJECTIVES.
Reference log-probs come in precomputed (from the reference actor or the on-disk cache) as
`RefLogps`, so a step never holds two models.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.config import DPOConfig, KTOConfig, ORPOConfig, PPOConfig, RMConfig, RunConfig, SFTConfig
from rlhf.kl import logp_gap
from rlhf.losses import (
    LENGTH_NORMALISED,
    bradley_terry_loss,
    classification_loss,
    entropy_loss,
    kl_penalty_loss,
    kto_loss,
    off_policy_weights,
    orpo_loss,
    policy_loss,
    preference_loss,
    sft_loss,
    value_loss,
)
from rlhf.ops import entropy_from_logits, masked_sum, shifted_token_logps
from rlhf.types import ClassificationBatch, Experience, PreferenceBatch, SFTBatch, UnpairedBatch

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SequenceLogps:
    """Per-row sums of response-token log-probs, [B], and the response lengths, [B]."""

    sums: torch.Tensor
    lengths: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.lengths.clamp(min=1)


@dataclass(frozen=True)
class RefLogps:
    """Reference log-prob sums for a batch: `logps` per row of the batch (for preference
    batches, chosen rows then rejected rows) and, for KTO, of the mismatched KL rows."""

    logps: torch.Tensor
    kl_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class KLPenalty:
    """What a PPO update needs for ppo.kl_penalty=loss: the coefficient β of this step and the
    reference's per-token log-probs [B, T-1] of the micro-batch's rows, either a tensor or a
    handle whose get() delivers it (the trainer asks only after its own forward pass, so
    the reference forward can still be running meanwhile)."""

    coef: float
    ref_logps: Any

    def logps(self, device) -> torch.Tensor:
        ref = self.ref_logps
        return (ref if isinstance(ref, torch.Tensor) else ref.get()).to(device)


def sequence_logps(model, input_ids, attention_mask, response_mask) -> SequenceLogps:
    """Sum of log π(token) over the response tokens of each row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    token_logps = shifted_token_logps(logits, input_ids)
    mask = response_mask[:, 1:]
    return SequenceLogps(masked_sum(token_logps, mask, dim=-1), mask.sum(-1))


@torch.no_grad()
def reference_logps(model, batch: PreferenceBatch | UnpairedBatch) -> RefLogps:
    """What the objectives need from the frozen reference model for this batch."""
    main = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask).sums
    if isinstance(batch, UnpairedBatch):
        kl = sequence_logps(
            model, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_response_mask
        ).sums
        return RefLogps(main, kl)
    return RefLogps(main)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[0] // 2
    return x[:half], x[half:]


def dpo_objective(
    model, batch: PreferenceBatch, ref: RefLogps | None, d: DPOConfig
) -> tuple[torch.Tensor, Metrics]:
    """The DPO family: one forward over chosen and rejected rows together."""
    policy = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    normalise = d.loss_type in LENGTH_NORMALISED
    logps = policy.means if normalise else policy.sums
    ref_chosen = ref_rejected = None
    if ref is not None:
        ref_values = ref.logps / policy.lengths.clamp(min=1) if normalise else ref.logps
        ref_chosen, ref_rejected = _split(ref_values)
    chosen, rejected = _split(logps)
    return preference_loss(
        d.loss_type,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=d.beta,
        label_smoothing=d.label_smoothing,
        gamma=d.simpo_gamma,
    )


def orpo_objective(
    model, batch: PreferenceBatch, ref: RefLogps | None, o: ORPOConfig
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: NLL of the chosen responses (token mean) + λ × odds-ratio term."""
    policy = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    chosen_sums, _ = _split(policy.sums)
    chosen_lengths, _ = _split(policy.lengths)
    nll = -chosen_sums.sum() / chosen_lengths.sum().clamp(min=1)
    chosen_avg, rejected_avg = _split(policy.means)
    return orpo_loss(chosen_avg, rejected_avg, nll, lam=o.lam)


def kto_objective(
    model, batch: UnpairedBatch, ref: RefLogps | None, k: KTOConfig
) -> tuple[torch.Tensor, Metrics]:
    if ref is None or ref.kl_logps is None:
        raise ValueError("KTO needs reference log-probs of the batch and of its KL rows")
    policy = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    with torch.no_grad():
        kl_policy = sequence_logps(
            model, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_response_mask
        )
    return kto_loss(
        policy.sums,
        ref.logps,
        batch.desirable,
        kl_policy.sums,
        ref.kl_logps,
        beta=k.beta,
        desirable_weight=k.desirable_weight,
        undesirable_weight=k.undesirable_weight,
    )


def sft_objective(
    model, batch: SFTBatch, ref: RefLogps | None, sft: SFTConfig
) -> tuple[torch.Tensor, Metrics]:
    logits = model(**batch.model_inputs()).logits
    token_logps = shifted_token_logps(logits, batch.input_ids)
    return sft_loss(token_logps, batch.loss_mask[:, 1:], sft.aggregation)


def rm_pairwise_objective(
    model, batch: PreferenceBatch, ref: RefLogps | None, rm: RMConfig
) -> tuple[torch.Tensor, Metrics]:
    scores = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits.squeeze(-1)
    chosen, rejected = _split(scores)
    margin = torch.full_like(chosen, rm.margin) if rm.margin else None
    return bradley_terry_loss(chosen, rejected, margin)


def rm_classification_objective(
    model, batch: ClassificationBatch, ref: RefLogps | None, rm: RMConfig
) -> tuple[torch.Tensor, Metrics]:
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    return classification_loss(logits, batch.labels)


def _takes_logits_to_keep(model) -> bool:
    """Whether the HF model under any DeepSpeed engine / peft wrapper accepts logits_to_keep."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_logits(model, input_ids, attention_mask, start: int = 0) -> torch.Tensor:
    """Logits [B, T-start, V] of positions start..T-1 only. The LM head (a small model's
    largest matmul, and every model's largest activation) then runs on those positions alone
    when the model takes `logits_to_keep`; otherwise the full logits are sliced."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if start > 0 and _takes_logits_to_keep(model):
        return model(**kwargs, logits_to_keep=input_ids.shape[1] - start).logits
    return model(**kwargs).logits[:, start:]


def response_start(action_mask: torch.Tensor) -> int:
    """The first column of [B, T-1] per-token tensors that any row acts in (0 if none)."""
    cols = action_mask.bool().any(0).nonzero()
    return int(cols[0]) if len(cols) else 0


def logps_from(logits: torch.Tensor, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Next-token log-probs [B, T-1] from `causal_logits(..., start)`: 0 before column `start`."""
    return F.pad(shifted_token_logps(logits, input_ids[:, start:]), (start, 0))


def token_logps(model, input_ids, attention_mask, start: int = 0) -> torch.Tensor:
    """Next-token log-probs [B, T-1] (column t scores token t+1). Columns before `start` (the
    prompt, when only the response counts) are 0 and never computed."""
    return logps_from(causal_logits(model, input_ids, attention_mask, start), input_ids, start)


def token_values(critic, input_ids, attention_mask) -> torch.Tensor:
    """Critic values [B, T-1]: column t is V(state after token t), the baseline of token t+1."""
    return (
        critic(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        .logits[:, :-1, 0]
        .float()
    )


def ppo_policy_objective(
    model, exp: Experience, ref: KLPenalty | None, p: PPOConfig
) -> tuple[torch.Tensor, Metrics]:
    """Clipped surrogate plus the entropy bonus (and, with ppo.kl_penalty=loss, β·KL to the
    reference) on one experience micro-batch."""
    # Only the response's logits: everything per token is 0 before the first action column.
    start = response_start(exp.action_mask)
    logits = causal_logits(model, exp.input_ids, exp.attention_mask, start)
    logps = logps_from(logits, exp.input_ids, start)
    old = logps.detach() if exp.old_logps is None else exp.old_logps
    weights, counted, correction = None, exp.action_mask, {}
    if p.off_policy_correction != "none":
        if exp.rollout_logps is None:
            raise ValueError("ppo.off_policy_correction needs the engine's log-probs")
        weights, counted, correction = off_policy_weights(
            old,
            exp.rollout_logps,
            exp.action_mask,
            mode=p.off_policy_correction,
            cap=p.off_policy_cap,
        )
    loss, metrics = policy_loss(
        logps,
        old,
        exp.advantages,
        counted,
        kind=p.policy_loss,
        norm_length=p.norm_length,
        clip_eps=p.clip_eps,
        clip_eps_high=p.clip_eps_high,
        dual_clip=p.dual_clip,
        aggregation=p.aggregation,
        is_weights=weights,
    )
    metrics.update(correction)
    with torch.set_grad_enabled(p.entropy_coef > 0):
        acting = exp.action_mask.bool()
        entropy = torch.zeros(acting.shape, dtype=torch.float32, device=logits.device)
        entropy = entropy.masked_scatter(
            acting, entropy_from_logits(logits[:, :-1][acting[:, start:]])
        )
        bonus, entropy_metrics = entropy_loss(
            entropy,
            exp.action_mask,
            coef=p.entropy_coef,
            aggregation=p.aggregation,
            norm_length=p.norm_length,
        )
    metrics.update(entropy_metrics)
    if exp.old_logps is None and exp.rollout_logps is not None:
        # π_old is this forward itself: its gap to the engine's numbers, at the same weights.
        # (The trainer averages metrics over micro-batches, and keeps the maximum of *_max.)
        metrics.update(logp_gap(old, exp.rollout_logps, exp.action_mask))
    if ref is not None:  # fetched only now: the reference forward overlapped ours
        kl, kl_metrics = kl_penalty_loss(
            logps,
            ref.logps(logps.device),
            exp.action_mask,
            coef=ref.coef,
            estimator=p.kl_estimator,
            aggregation=p.aggregation,
            norm_length=p.norm_length,
        )
        loss = loss + kl
        metrics.update(kl_metrics)
    return loss + bonus, metrics


def ppo_value_objective(
    critic, exp: Experience, ref: RefLogps | None, p: PPOConfig
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss on one experience micro-batch (weighted by ppo.vf_coef)."""
    values = token_values(critic, exp.input_ids, exp.attention_mask)
    loss, metrics = value_loss(
        values,
        exp.old_values,
        exp.returns,
        exp.action_mask,
        clip_range=p.value_clip,
        aggregation=p.aggregation,
        norm_length=p.norm_length,
    )
    return p.vf_coef * loss, metrics


#: key -> (the objective, the RunConfig section it reads).
OBJECTIVES: dict[str, tuple[Callable, str]] = {
    "dpo": (dpo_objective, "dpo"),
    "orpo": (orpo_objective, "orpo"),
    "kto": (kto_objective, "kto"),
    "sft": (sft_objective, "sft"),
    "rm/preference": (rm_pairwise_objective, "rm"),
    "rm/classification": (rm_classification_objective, "rm"),
    "ppo/policy": (ppo_policy_objective, "ppo"),
    "ppo/value": (ppo_value_objective, "ppo"),
}


@dataclass(frozen=True)
class Objective:
    """A trainer's loss, chosen once at setup: the objective function and its own config
    section (all a trainer needs of the algorithm's settings); called as
    `objective(model, batch, ref) -> (loss, metrics)`."""

    fn: Callable
    section: Any

    def __call__(self, model, batch, ref) -> tuple[torch.Tensor, Metrics]:
        return self.fn(model, batch, ref, self.section)


def objective_for(cfg: RunConfig, role: str = "policy") -> Objective:
    """The objective a trainer role optimises (a dict lookup at setup, never a branch in the
    step): the offline algorithm's, or for ppo the policy surrogate / the critic's value loss."""
    if cfg.algorithm == "ppo":
        key = "ppo/value" if role == "critic" else "ppo/policy"
    else:
        key = f"rm/{cfg.data_format}" if cfg.algorithm == "rm" else cfg.algorithm
    fn, section = OBJECTIVES[key]
    if section == "ppo" and cfg.ppo.norm_length is None:
        # seq_mean_token_sum_norm's constant defaults to the longest response the run samples.
        norm = cfg.roles.rollout.max_new_tokens
        return Objective(fn, cfg.ppo.model_copy(update={"norm_length": norm}))
    return Objective(fn, getattr(cfg, section))


def model_kind(cfg: RunConfig) -> str:
    """Which model class the trained role loads."""
    if cfg.algorithm != "rm":
        return "causal"
    return "classifier" if cfg.data_format == "classification" else "reward"


@torch.no_grad()
def metric_sums(objective: Objective, model, pairs: Iterable[tuple]) -> dict[str, float]:
    """An eval pass: the loss and metrics of each (batch, reference log-probs) pair, summed
    weighted by the batch's rows, with the row count under 'n' (divide by it for the means;
    sums from several ranks add up first)."""
    sums: dict[str, float] = {"n": 0.0}
    for batch, ref in pairs:
        loss, metrics = objective(model, batch, ref)
        index = getattr(batch, "index", None)
        rows = (len(index) if index is not None else 0) or 1
        sums["n"] += rows
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * rows
    return sums
