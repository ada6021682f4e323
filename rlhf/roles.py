"""What each actor receives of the run: its role's own share of the RunConfig, cut by the
driver when it starts the role's group (DESIGN: each actor gets only its sub-config). A
reward endpoint's settings reach the reward actor only, the algorithm's settings only the
trainers (as their Objective), sampling settings only the engines.

Frozen dataclasses of the config's own sections, pickled to the actors as they start.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ModelConfig, RewardConfig, RolloutConfig, RunConfig, TrainConfig
from rlhf.objectives import Objective, model_kind, objective_for


@dataclass(frozen=True)
class EngineSpec:
    """A rollout engine's share (and the hybrid policy's, which samples too)."""

    model: ModelConfig  #: the policy's model: the engine's initial weights and tokenizer
    rollout: RolloutConfig  #: roles.rollout: sampling, backend, vLLM settings
    seed: int  #: train.seed: every sampling seed derives from it
    precision: str  #: train.precision
    max_length: int  #: data.max_length (vLLM's context: it + max_new_tokens)


@dataclass(frozen=True)
class TrainerSpec:
    """A DeepSpeed trainer rank's share (the policy, the critic)."""

    role: str  #: "policy" or "critic"
    kind: str  #: the model class it trains (rlhf.models: causal, reward, classifier, critic)
    model: ModelConfig  #: its model (the critic's: roles.critic.model, else the reward model's, else the policy's)
    tokenizer: ModelConfig  #: the policy's model, whose tokenizer (pad id) the batches use
    train: TrainConfig  #: the train section (the critic's with roles.critic.lr)
    rows_per_update: int  #: rows of one optimizer step over all ranks
    num_labels: int  #: data.num_labels (classifier reward models)
    objective: Objective  #: its loss and the algorithm section it reads
    engine: EngineSpec | None = None  #: the policy's: its sampling as the hybrid engine


@dataclass(frozen=True)
class ReferenceSpec:
    """The frozen reference's share."""

    model: ModelConfig  #: roles.reference.model, else the policy's base model (no adapter)
    precision: str  #: train.precision


@dataclass(frozen=True)
class RewardSpec:
    """The reward source's share (on the reward actor, or in the driver)."""

    reward: RewardConfig  #: roles.reward
    max_length: int  #: data.max_length: a reward model's truncation
    precision: str  #: train.precision


def engine_spec(cfg: RunConfig) -> EngineSpec:
    return EngineSpec(
        cfg.model, cfg.roles.rollout, cfg.train.seed, cfg.train.precision, cfg.data.max_length
    )


def trainer_spec(cfg: RunConfig, role: str = "policy") -> TrainerSpec:
    common = {
        "role": role,
        "tokenizer": cfg.model,
        "rows_per_update": cfg.rows_per_update,
        "num_labels": cfg.data.num_labels,
        "objective": objective_for(cfg, role),
    }
    if role == "critic":
        c, r = cfg.roles.critic, cfg.roles.reward
        model = c.model or (r.model if r.type == "model" else None) or cfg.model
        train = cfg.train if c.lr is None else cfg.train.model_copy(update={"lr": c.lr})
        model = model.model_copy(update={"quantization": None})
        return TrainerSpec(kind="critic", model=model, train=train, **common)
    return TrainerSpec(
        kind=model_kind(cfg), model=cfg.model, train=cfg.train, engine=engine_spec(cfg), **common
    )


def reference_spec(cfg: RunConfig) -> ReferenceSpec:
    # The policy's initial weights: the base model without the policy's adapter (a fresh LoRA
    # adapter is zero, so base == initial policy); its own model when configured.
    model = (cfg.roles.reference.model or cfg.model).model_copy(update={"lora": None})
    return ReferenceSpec(model, cfg.train.precision)


def reward_spec(cfg: RunConfig) -> RewardSpec:
    return RewardSpec(cfg.roles.reward, cfg.data.max_length, cfg.train.precision)
