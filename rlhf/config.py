"""The run configuration: frozen, validated models for the whole run.

YAML file -> `key.sub=value` overrides -> one validation step (`load_config`). Defaults live
only in the fields below, each with a one-line docstring. Unknown keys are rejected with the
closest valid key; wrong types and impossible combinations fail before anything starts.

The models are pydantic (frozen, `extra="forbid"`): they give frozen-dataclass semantics plus
type coercion and error locations, which plain dataclasses would need hand-written code for.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.losses.preference import PAIRED_LOSSES, REFERENCE_FREE


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def import_object(spec: str, key: str, error: type[Exception] = ConfigError):
    """What a 'package.module:name' setting (config key `key`) names, imported; `error` (with
    the key, the reason and the fix) when it cannot be."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise error(
            f"{key}={spec!r} cannot be imported ({err}): give 'package.module:name' of an "
            "importable module (on the actors' PYTHONPATH too)"
        ) from None


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, validate_default=True
    )


# --------------------------------------------------------------------------- models


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: int = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    modules_to_save: list[str] = []
    """Extra modules trained in full and saved with the adapter (e.g. a classifier head)."""


class QuantizationConfig(_Section):
    load_in_4bit: bool = True
    """Load base weights in 4 bit with bitsandbytes (QLoRA, Dettmers et al. 2023)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantise the quantisation constants too."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype of the de-quantised matmuls ('auto' = the model dtype)."""


class ModelConfig(_Section):
    name_or_path: str = "builtin:tiny"
    """HF hub name, local folder, or builtin:tiny / builtin:smollm2-135m-instruct (offline)."""
    tokenizer: str | None = None
    """Tokenizer name or path when it differs from the model's."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Run model code from the checkpoint's repository. Off unless you trust the source."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel; auto = flash_attention_2 when installed on compute capability >= 8, else sdpa."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraConfig | None = None
    """LoRA/DoRA adapter; null = train all weights."""
    quantization: QuantizationConfig | None = None
    """4-bit base weights (QLoRA); needs `lora`."""
    chat_template: str | None = None
    """Jinja chat template overriding the tokenizer's (or a path to a .jinja file)."""
    num_parameters: float | None = Field(None, gt=0)
    """Parameter count for the placement plan's memory estimate; null = counted from config.json."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.quantization is not None and self.lora is None:
            raise ValueError(
                "quantization (QLoRA) trains adapters on frozen 4-bit weights: set model.lora too"
            )
        return self


# --------------------------------------------------------------------------- data


class DatasetSource(_Section):
    path: str
    """Local .jsonl/.json/.parquet/.csv file, a folder from `save_to_disk`, or a hub dataset name."""
    split: str = "train"
    """Split to read (hub datasets and `save_to_disk` folders)."""
    name: str | None = None
    """Hub dataset configuration name."""
    data_dir: str | None = None
    """Sub-folder of a hub dataset (e.g. data/rl for stack-exchange-paired)."""
    preset: (
        Literal[
            "stack_exchange_paired",
            "ultrafeedback_binarized",
            "marc_ja",
            "imdb",
            "gsm8k",
            "math",
            "deepscaler",
        ]
        | None
    ) = None
    """Column mapping for a known dataset schema (gsm8k, math: MATH and MATH-500, deepscaler:
    problem/answer sets give prompts carrying their `answer`)."""
    columns: dict[str, str] = {}
    """Rename columns before validation: {their_name: our_name}."""
    ignore_columns: list[str] = []
    """Columns to drop before validation (any other unknown column quarantines the row; prompt
    rows keep theirs as fields for the reward)."""
    limit: int | None = Field(None, gt=0)
    """Read at most this many rows."""


class DataConfig(_Section):
    train: DatasetSource = DatasetSource(path="builtin:reviews")
    """Training data. builtin:reviews is a small synthetic set the project generates offline."""
    eval: DatasetSource | None = None
    """Evaluation data (null = none)."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Hold out this fraction of train for eval when `eval` is null."""
    format: Literal["auto", "preference", "sft", "prompt", "unpaired", "classification"] = "auto"
    """Row format; auto = what the algorithm needs, checked against the columns."""
    max_length: int = Field(512, gt=1)
    """Maximum tokens of prompt + response."""
    max_prompt_length: int | None = Field(None, gt=0)
    """Maximum prompt tokens; null = max_length // 2."""
    truncation_mode: Literal["keep_end", "keep_start", "drop"] = "keep_end"
    """Over-long prompts: keep their last tokens, their first tokens, or quarantine the row."""
    strict: bool = False
    """Refuse to start on the first bad row instead of quarantining it."""
    max_bad_fraction: float = Field(0.5, ge=0, le=1)
    """Refuse to start when more than this fraction of rows is bad."""
    packing: bool = False
    """SFT: pack several examples into each row (attention stays within each example)."""
    chat_prompts: bool = False
    """Prompt data: send plain-string prompts as a user message through the chat template."""
    completion_only_loss: bool = True
    """SFT: train on the completion / assistant tokens only."""
    tools: list[str] = []
    """'module:function' tools whose JSON schemas the chat template renders into every
    conversation (its `tools=`): SFT on tool-use transcripts (messages with tool calls and
    `tool` results) sees the tools as the episodes of roles.rollout.environment do."""
    num_labels: int = Field(2, ge=1)
    """Classification: number of classes."""
    seed: int = 0
    """Shuffling and eval-split seed."""

    @property
    def prompt_limit(self) -> int:
        return (
            self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2
        )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.prompt_limit >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.prompt_limit}) must be below data.max_length "
                f"({self.max_length}) to leave room for a response"
            )
        return self


# --------------------------------------------------------------------------- algorithms


class SFTConfig(_Section):
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    """How token losses are averaged."""


class RMConfig(_Section):
    objective: Literal["pairwise", "classification"] = "pairwise"
    """Bradley–Terry on preference pairs, or cross-entropy on labelled text."""
    margin: float = 0.0
    """Constant margin m in -log σ(r_w - r_l - m)."""


class DPOConfig(_Section):
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge", "simpo"] = "sigmoid"
    """sigmoid (DPO), robust (rDPO), ipo, hinge (SLiC), simpo (reference-free)."""
    beta: float = Field(0.1, gt=0)
    """β: strength of the KL regularisation (inverse temperature of the implicit reward)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """ε: assumed preference-label noise (cDPO for sigmoid/simpo, rDPO for robust)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin γ."""
    precompute_ref_logps: bool = False
    """Compute reference log-probs for the whole dataset ahead and cache them on disk."""


class KTOConfig(_Section):
    beta: float = Field(0.1, gt=0)
    """β of KTO's value function."""
    desirable_weight: float = Field(1.0, gt=0)
    """λ_D."""
    undesirable_weight: float = Field(1.0, gt=0)
    """λ_U."""


class ORPOConfig(_Section):
    lam: float = Field(0.1, gt=0, alias="lambda")
    """λ weighting the odds-ratio term against the NLL (write `lambda:` in YAML)."""

    model_config = ConfigDict(populate_by_name=True)


#: ppo.preset -> the settings it fills (keys the ppo section sets itself win).
PPO_PRESETS: dict[str, dict[str, Any]] = {
    # Yu et al. 2025 (DAPO, §3): clip-higher (ε_low 0.2, ε_high 0.28), token-level loss,
    # dynamic sampling, soft overlong punishment, no KL term.
    "dapo": {
        "estimator": "grpo",
        "clip_eps": 0.2,
        "clip_eps_high": 0.28,
        "aggregation": "token_mean",
        "dynamic_sampling": True,
        "overlong_buffer": "auto",
        "kl_coef": 0.0,
    },
    # Liu et al. 2025 (Dr. GRPO, §3.1): no std scaling of the group advantage, and no
    # per-response length normalisation (a constant normaliser instead).
    "dr_grpo": {
        "estimator": "grpo",
        "scale_rewards": "none",
        "aggregation": "seq_mean_token_sum_norm",
    },
    # Zheng et al. 2025 (GSPO, §5.1): the sequence ratio, clipped to [1 - 3e-4, 1 + 4e-4],
    # averaged per response.
    "gspo": {
        "estimator": "grpo",
        "policy_loss": "gspo",
        "clip_eps": 3e-4,
        "clip_eps_high": 4e-4,
        "aggregation": "seq_mean_token_mean",
    },
}


class PPOConfig(_Section):
    @model_validator(mode="after")
    def _check_loss(self) -> PPOConfig:
        if self.dual_clip is not None and self.policy_loss == "cispo":
            raise ValueError(
                "ppo.dual_clip bounds the clipped surrogate: not with policy_loss cispo"
            )
        return self

    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """Advantage estimator; only gae uses a critic."""
    ppo_epochs: int = Field(1, gt=0)
    """Passes over each batch of experience."""
    clip_eps: float = Field(0.2, gt=0)
    """ε of the clipped surrogate."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO); null = clip_eps."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip bound c for negative advantages; null = off."""
    value_clip: float | None = Field(0.2, gt=0)
    """Value-loss clip range; null = unclipped."""
    vf_coef: float = Field(0.5, ge=0)
    """Weight of the value loss (critic)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial KL penalty coefficient β (0 = no reference model)."""
    kl_target: float | None = Field(None, gt=0)
    """Target KL for the adaptive controller; null = fixed coefficient."""
    kl_horizon: int = Field(10000, gt=0)
    """Adaptive controller horizon."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (in the reward or the loss: kl_penalty)."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where β·KL(π || π_ref) goes. reward: -β·KL per token is added to the rewards before the advantages (RLHF PPO, Ziegler et al. 2019). loss: β·KL per token is added to the policy loss, aggregated like it (GRPO, Shao et al. 2024; TRL's GRPOTrainer; usually with kl_estimator k3)."""
    aggregation: Literal[
        "token_mean",
        "seq_mean",
        "seq_mean_token_mean",
        "seq_mean_token_sum",
        "seq_mean_token_sum_norm",
    ] = "token_mean"
    """Loss aggregation over tokens: token_mean (all counted tokens of the micro-batch alike;
    DAPO), seq_mean_token_mean (= seq_mean: each response's mean, then the mean over responses;
    GRPO), seq_mean_token_sum, seq_mean_token_sum_norm (the token sum over B × norm_length, a
    constant: Dr. GRPO)."""
    norm_length: int | None = Field(None, gt=0)
    """The constant of seq_mean_token_sum_norm; null = roles.rollout.max_new_tokens."""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """The surrogate: ppo (clipped token ratio; with clip_eps_high, DAPO's clip-higher), gspo
    (the clip on each response's length-normalised sequence ratio; Zheng et al. 2025), cispo
    (REINFORCE weighted by the clipped, stop-gradient token ratio; MiniMax-M1 2025)."""
    preset: Literal["dapo", "dr_grpo", "gspo"] | None = None
    """Published combinations, filling the keys this section does not set itself (see
    PPO_PRESETS in rlhf/config.py; applied by build_config, before the defaults): dapo,
    dr_grpo, gspo."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal carry no gradient signal;
    they are dropped and more prompts sampled until the batch is full (synchronous loop)."""
    dynamic_sampling_max_rounds: int = Field(3, ge=1)
    """Extra generation rounds per step at most; a batch still short is filled with dropped
    groups (dynamic_sampling/short_groups)."""
    overlong_buffer: int | Literal["auto"] | None = None
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a response longer than
    max_new_tokens − L loses up to overlong_penalty linearly over the last L tokens (L = this;
    auto = a fifth of roles.rollout.max_new_tokens). null = off."""
    overlong_penalty: float = Field(1.0, ge=0)
    """The penalty of a response that reaches max_new_tokens (overlong_buffer)."""
    mask_truncated: bool = False
    """Leave responses cut at max_new_tokens (no EOS) out of the loss (DAPO's overlong filtering)."""
    whiten_advantages: bool | None = None
    """Whiten advantages over the batch; null = true for gae, false for grpo and rloo (their
    group baseline already centres each prompt's samples, and a batch-wide shift would give
    unanimous groups a non-zero advantage; TRL does not whiten them either). REINFORCE++
    whitens by definition."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide each group's centred scores by the group's std (group), by the batch's std
    (batch), or not at all (none: Dr. GRPO, Liu et al. 2025)."""
    num_mini_batches: int = Field(1, ge=1)
    """Optimizer steps per PPO epoch: the rollout batch is cut into this many mini-batches."""
    old_logps: Literal["recompute", "rollout"] = "recompute"
    """π_old of the ratio and of a KL in the reward. recompute: a policy forward after each rollout. rollout: the log-probs the rollout engine returned, no forward; the same numbers on the HF backend at the trainer's precision (fp32: within 1e-5), but a vLLM or bf16 engine's numerics differ from the trainer's."""
    off_policy_correction: Literal["none", "tis", "mis"] = "none"
    """Correct for the engine that sampled (the behaviour policy) computing other log-probs than the trainer's π_old (vLLM kernels, bf16), per token, with w = π_old / π_behaviour (a constant). tis: truncated importance sampling, the policy loss weighted by min(w, off_policy_cap) (Yao et al. 2025). mis: masked importance sampling, tokens with w outside [1/cap, cap] are left out of the policy loss. none: no correction (the gap is still logged, rollout/logp_gap_*)."""
    off_policy_cap: float = Field(2.0, gt=1)
    """C of off_policy_correction: the truncation of tis, the band [1/C, C] of mis."""


# --------------------------------------------------------------------------- roles


class RoleResources(_Section):
    num_nodes: int = Field(1, ge=1)
    """Nodes this role spans."""
    ranks_per_node: int = Field(1, ge=1)
    """Processes (data-parallel ranks or engines) per node."""
    cpus_per_rank: float = Field(1, gt=0)
    """CPUs reserved for each rank."""
    gpus_per_rank: float = Field(0, ge=0)
    """GPUs for each rank; a fraction < 1 colocates ranks of several roles on one GPU."""

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.ranks_per_node

    @model_validator(mode="after")
    def _check(self) -> RoleResources:
        if self.gpus_per_rank > 1 and not float(self.gpus_per_rank).is_integer():
            raise ValueError(
                f"gpus_per_rank={self.gpus_per_rank}: above 1 it must be a whole number of GPUs"
            )
        return self


class ReferenceConfig(_Section):
    enabled: bool | None = None
    """null = as the algorithm needs; false/true to force (refused where it cannot work)."""
    model: ModelConfig | None = None
    """Reference weights; null = the policy's initial weights."""
    resources: RoleResources = RoleResources()
    """Placement of the reference ranks."""


class VerifierConfig(_Section):
    kind: Literal["math", "exact", "regex", "format", "code"]
    """math: the extracted final answer is mathematically equal to the row's ground truth
    (math-verify); exact: equal as text (whitespace and case folded); regex: `pattern` found in
    the response; format: the whole response matches `pattern` (default: <think>…</think>
    <answer>…</answer>); code: the response's last code block, then the row's tests, run in a
    sandboxed subprocess (exit 0 = pass)."""
    weight: float = 1.0
    """Its weight in the reward (a weighted sum over the verifiers)."""
    field: str | None = None
    """The row's ground-truth field; null = `answer` (math, exact) or `tests` (code)."""
    extract: Literal["auto", "boxed", "last_number", "answer_tag", "none"] = "auto"
    """How math/exact find the final answer: the last \\boxed{}, the last number, the last
    <answer> tag, auto (the first of those found), none (the whole response)."""
    pattern: str | None = None
    """The regular expression of regex (required) and format (optional)."""
    timeout_s: float = Field(5.0, gt=0)
    """Per response: math-verify's parse/verify bound, code's wall clock (and CPU) limit."""
    memory_mb: int = Field(512, ge=64)
    """code: the program's address-space limit."""

    @property
    def ground_truth(self) -> str | None:
        """The row field this verifier reads (None for regex and format)."""
        if self.kind in ("regex", "format"):
            return self.field
        return self.field or ("tests" if self.kind == "code" else "answer")

    @model_validator(mode="after")
    def _check(self) -> VerifierConfig:
        if self.kind == "regex" and not self.pattern:
            raise ValueError("a regex verifier needs `pattern`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(
                    f"pattern {self.pattern!r} is not a regular expression: {err}"
                ) from None
        return self


class RewardConfig(_Section):
    type: Literal["none", "model", "function", "http", "verifiable"] = "none"
    """Reward source for online RL. verifiable: `verifiers` check each response against the
    ground truth of its prompt row."""
    verifiers: list[VerifierConfig] = []
    """type verifiable: the checks, summed with their weights; the first one decides whether a
    sample is correct (pass@k)."""
    workers: int = Field(2, ge=0)
    """type verifiable: processes verifying in parallel (0 = in the scoring process)."""
    model: ModelConfig | None = None
    """Sequence-classifier checkpoint (type: model)."""
    function: str | None = None
    """'module:function' taking (prompts, responses) and returning floats (type: function); the
    prompt rows' extra fields it names as parameters (e.g. `answer`) come as keyword lists, all
    of them if it takes **kwargs."""
    url: str | None = None
    """Endpoint taking JSON {prompts, responses} and returning {rewards} (type: http)."""
    token_env: str | None = None
    """Environment variable holding the endpoint's bearer token (never put the token here)."""
    headers: dict[str, str] = {}
    """Extra HTTP headers; values of auth/key/token headers are redacted from logged configs."""
    timeout_s: float = Field(30.0, gt=0)
    """HTTP timeout per request."""
    retries: int = Field(2, ge=0)
    """HTTP retries after a failure."""
    baseline: float = 0.0
    """Constant subtracted from every score."""
    normalize: bool = False
    """Running mean/std normalisation of scores."""
    clip: float | None = Field(None, gt=0)
    """Clip shaped scores to [-clip, clip]."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses truncated before EOS."""
    resources: RoleResources = RoleResources()
    """Placement of the reward ranks."""
    run_in: Literal["auto", "actor", "driver"] = "auto"
    """Where scoring runs: `actor` (a reward actor, with `resources`) or `driver` (in the
    coordinator, no Ray call per step; not for `type: model`). `auto` = driver for a function
    or verifiers on no GPU, else actor."""

    @property
    def in_driver(self) -> bool:
        """Scores are computed in the coordinator's process, without a reward actor."""
        if self.run_in == "auto":
            cpu = self.resources.gpus_per_rank == 0
            return self.type in ("function", "verifiable") and cpu
        return self.run_in == "driver"

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        need = {"model": "model", "function": "function", "http": "url"}.get(self.type)
        if need and getattr(self, need) is None:
            raise ValueError(f"reward.type={self.type} needs reward.{need}")
        if (self.type == "verifiable") != bool(self.verifiers):
            raise ValueError(
                "reward.type=verifiable needs reward.verifiers (e.g. [{kind: math}])"
                if self.verifiers == []
                else f"reward.verifiers are used by type verifiable only (type is {self.type})"
            )
        if self.run_in == "driver" and self.type == "model":
            raise ValueError(
                "reward.run_in=driver: a reward model runs in an actor (its own resources); "
                "use run_in: actor or auto"
            )
        if self.function is not None and not re.fullmatch(r"[\w.]+:\w+", self.function):
            raise ValueError(
                f"reward.function must look like 'package.module:function', got {self.function!r}"
            )
        return self


class CriticConfig(_Section):
    model: ModelConfig | None = None
    """Critic initialisation; null = from the reward model if it is an HF model, else the policy."""
    lr: float | None = Field(None, gt=0)
    """Critic learning rate; null = the policy's."""
    resources: RoleResources = RoleResources()
    """Placement of the critic ranks."""


class EnvironmentConfig(_Section):
    """Multi-turn rollouts (rlhf.envs, rlhf.episodes): each sample is an episode in which the
    model and an environment take turns; the trained sequence keeps the model's tokens as
    generated and the environment's as its chat template adds them (never trained on)."""

    name: str = "tools"
    """`tools` (the model calls `tools`; a turn without a call is its answer), `single_turn`
    (one turn: today's rollouts through the episode path), or 'module:Class' of your own
    (reset(row) -> messages, step(text) -> rlhf.envs.Step), built with `args`."""
    tools: list[str] = []
    """'module:function' tools (type hints and a docstring with an Args section: their JSON
    schemas go to the chat template's `tools=`)."""
    parser: Literal["hermes"] = "hermes"
    """Tool-call format read from the model's turns: hermes = `<tool_call>{"name": …,
    "arguments": {…}}</tool_call>` (Qwen2.5, Hermes and other ChatML-family templates)."""
    tool_timeout_s: float = Field(5.0, gt=0)
    """Wall-clock bound of one tool call: past it the model is told it timed out."""
    max_calls_per_turn: int = Field(4, ge=1)
    """Tool calls run per turn (more are answered with nothing, counted)."""
    max_turns: int = Field(4, ge=1)
    """The model's turns per episode."""
    max_total_tokens: int | None = Field(None, gt=0)
    """Tokens after the prompt per episode (the model's and the environment's); each turn is
    also capped at roles.rollout.max_new_tokens. null = max_turns × max_new_tokens."""
    args: dict[str, Any] = {}
    """Keyword arguments of the environment: for `tools`, `system` (a system message) and
    `examples` (messages of worked exchanges put before each prompt); a 'module:Class' gets
    them all (and with `tools` set, the functions as `tools=`)."""

    @model_validator(mode="after")
    def _check(self) -> EnvironmentConfig:
        name_ok = self.name in ("tools", "single_turn") or re.fullmatch(r"[\w.]+:\w+", self.name)
        if not name_ok:
            raise ValueError(
                f"name must be tools, single_turn or 'package.module:Class', got {self.name!r}"
            )
        for tool in self.tools:
            if not re.fullmatch(r"[\w.]+:\w+", tool):
                raise ValueError(f"tools: {tool!r} must look like 'package.module:function'")
        if self.name == "tools" and not self.tools:
            raise ValueError("name=tools needs tools (e.g. [rlhf.tools:calculator])")
        if self.name == "single_turn" and self.tools:
            raise ValueError("name=single_turn takes no tools")
        return self


class RolloutConfig(_Section):
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """auto = vLLM when importable on a GPU, else HF generate."""
    n_samples_per_prompt: int = Field(1, ge=1)
    """Responses per prompt (GRPO/RLOO need >= 2)."""
    eval_samples_per_prompt: int = Field(1, ge=1)
    """Responses per held-out prompt in evaluation: the held-out mean reward averages them all
    (more samples, less noise at temperature > 0)."""
    max_new_tokens: int = Field(64, gt=0)
    """Response length cap."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0 = greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0 = off)."""
    stop: list[str] = []
    """Stop strings."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism per engine."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM's share of GPU memory."""
    sleep: bool = False
    """vLLM on GPU: release the engine's GPU memory (sleep level 1) between rollouts, for colocated trainers."""
    hybrid: bool = False
    """Hybrid engine: generate inside the policy's own actors, one engine per policy rank,
    with the trainer's weights: no second copy of the model and no weight sync. HF backend,
    ZeRO 0-2 (ZeRO-3 shards the weights); `resources` is then unused."""
    max_staleness: int = Field(0, ge=0)
    """Asynchronous online training: the engines sample up to this many batches ahead of the policy, so generation overlaps the update; the batch trained at step t comes from weights at most this many updates old (rollout/staleness_*). 0: synchronous, every batch from the current weights. Separate engines only (the hybrid engine samples with the trainer's own weights, so it stays synchronous); pair it with ppo.off_policy_correction."""
    resources: RoleResources = RoleResources()
    """Placement of the rollout engines (separate actors; not with `hybrid`)."""
    environment: EnvironmentConfig | None = None
    """Multi-turn rollouts (tool calls, environments); null = one response per sample."""

    @property
    def episode_tokens(self) -> int:
        """Tokens after the prompt a sample may take: max_new_tokens, or a multi-turn
        episode's max_total_tokens."""
        env = self.environment
        if env is None or env.name == "single_turn":
            return self.max_new_tokens
        return env.max_total_tokens or env.max_turns * self.max_new_tokens


class PolicyConfig(_Section):
    resources: RoleResources = RoleResources()
    """Placement of the policy trainer ranks."""


class RolesConfig(_Section):
    policy: PolicyConfig = PolicyConfig()
    """The trained model."""
    reference: ReferenceConfig = ReferenceConfig()
    """Frozen reference model."""
    reward: RewardConfig = RewardConfig()
    """Reward source (online RL)."""
    critic: CriticConfig = CriticConfig()
    """Value model (PPO with GAE)."""
    rollout: RolloutConfig = RolloutConfig()
    """Generation engines (online RL)."""
    placement: Literal["auto", "colocate", "disaggregate"] = "auto"
    """colocate: GPU roles share GPUs (rank i of each on local GPU i); disaggregate: own GPUs; auto = colocate if any share < 1."""


class ClusterConfig(_Section):
    """The cluster a run is planned for. At start the live Ray cluster's nodes are used;
    these fields are what `rlhf check` and CI plan against (null = not declared: unlimited)."""

    nodes: int | None = Field(None, ge=1)
    """Number of nodes; null = as many as the roles need."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs on each node; null = not checked."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of each GPU in GiB (Ray does not report it, so it applies to live nodes too); null = not checked."""
    cpus_per_node: float | None = Field(None, gt=0)
    """CPUs on each node; null = not checked."""
    memory_gib: float | None = Field(None, gt=0)
    """Host memory of each node in GiB; null = not checked."""

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.gpu_memory_gib is not None and self.gpus_per_node == 0:
            raise ValueError("cluster.gpu_memory_gib is set but cluster.gpus_per_node is 0")
        return self


# --------------------------------------------------------------------------- training


class TrainConfig(_Section):
    epochs: int = Field(1, ge=1)
    """Passes over the training data (offline)."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; when set it wins over epochs (as in HF Trainer): the data is passed over as many times as the steps need."""
    global_batch_size: int = Field(8, gt=0)
    """Examples (pairs, prompts) per optimizer step, summed over ranks and accumulation."""
    micro_batch_size: int = Field(4, gt=0)
    """Examples per rank per forward/backward."""
    lr: float = Field(5e-6, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warm-up steps as a fraction of all steps."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warm-up steps as a count (overrides warmup_ratio when set)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping; null = off."""
    optimizer: Literal[
        "adamw", "cpu_adam", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"
    ] = "adamw"
    """torch AdamW, DeepSpeed CPU Adam, or bitsandbytes 8-bit / paged 8-bit / paged 32-bit AdamW."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer state on the CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; auto = bf16 where supported, fp32 on CPU."""
    seed: int = 42
    """Seed for model init, dropout and sampling."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate every N steps (and at the end); null = only at the end."""
    max_restarts: int = Field(0, ge=0)
    """When an actor dies: rebuild the groups and resume from the last checkpoint this many times."""
    max_bad_steps: int = Field(3, ge=0)
    """Steps with a non-finite loss to skip (no update) before one more aborts the run."""


class LoggingConfig(_Section):
    log_every: int = Field(1, gt=0)
    """Log metrics every N steps."""
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases mode (the API key is read from WANDB_API_KEY)."""
    project: str = "rlhf"
    """wandb project."""
    run_name: str | None = None
    """wandb run name; null = derived from output_dir."""
    tags: list[str] = []
    """wandb tags."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    progress: bool = True
    """Live progress line on a terminal; a plain line every few steps when the output is not one (a log file, a Ray job)."""
    verbose: bool = False
    """Also show library chatter: Hugging Face's per-actor loading and writing bars."""


class CheckpointConfig(_Section):
    every_steps: int | None = Field(None, gt=0)
    """Save every N steps (and always at the end); null = only at the end."""
    keep_last: int | None = Field(2, gt=0)
    """Keep only the newest N checkpoints; null = all."""
    resume: str = "never"
    """never, auto (this output_dir's run, from its newest whole checkpoint), or a checkpoint path. A run refuses to start in an output_dir that holds another run unless resume=auto or overwrite=true."""
    overwrite: bool = False
    """Start over in an output_dir that holds a previous run: remove that run's outputs (checkpoints, metrics, final model...) first."""
    allow_changes: list[str] = []
    """Config keys (or sections) that may differ from the checkpoint's when resuming; others refuse the resume, except the keys that are always safe (logging, checkpoint, train.max_steps...)."""
    verify: Literal["digest", "size"] = "digest"
    """What a checkpoint's manifest records and resume checks: SHA-256 and size of every file, or the size only (faster for very large checkpoints)."""
    export: Literal["merged", "adapter"] = "merged"
    """Final model with LoRA: merged weights or the adapter alone."""


# --------------------------------------------------------------------------- the run

Algorithm = Literal["sft", "rm", "dpo", "kto", "orpo", "ppo"]

#: Row format each algorithm trains on (rm also accepts classification).
ALGORITHM_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("sft",),
    "rm": ("preference", "classification"),
    "dpo": ("preference",),
    "kto": ("unpaired", "preference"),
    "orpo": ("preference",),
    "ppo": ("prompt",),
}


class RunConfig(_Section):
    algorithm: Algorithm = "dpo"
    """sft | rm | dpo (and its family, see dpo.loss_type) | kto | orpo | ppo (see ppo.estimator)."""
    output_dir: str = "outputs/run"
    """Where config.yaml, metrics.jsonl, checkpoints/ and the final model go."""
    model: ModelConfig = ModelConfig()
    """The policy (or reward model, for algorithm: rm)."""
    data: DataConfig = DataConfig()
    """Datasets and tokenisation."""
    train: TrainConfig = TrainConfig()
    """Optimisation."""
    roles: RolesConfig = RolesConfig()
    """Per-role models and placement."""
    cluster: ClusterConfig = ClusterConfig()
    """The declared cluster the placement plan is checked against (see rlhf.placement)."""
    sft: SFTConfig = SFTConfig()
    """SFT options."""
    rm: RMConfig = RMConfig()
    """Reward-model training options."""
    dpo: DPOConfig = DPOConfig()
    """DPO-family options."""
    kto: KTOConfig = KTOConfig()
    """KTO options."""
    orpo: ORPOConfig = ORPOConfig()
    """ORPO options."""
    ppo: PPOConfig = PPOConfig()
    """Online RL options."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics sinks."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing and resume."""

    # ---- derived facts the rest of the system asks for (never stored twice)

    @property
    def data_format(self) -> str:
        """The row format this run reads."""
        if self.data.format != "auto":
            return self.data.format
        if self.algorithm == "rm":
            return "classification" if self.rm.objective == "classification" else "preference"
        return ALGORITHM_FORMATS[self.algorithm][0]

    @property
    def reference_free(self) -> bool:
        """True when the algorithm uses no reference model."""
        if self.algorithm in ("sft", "rm", "orpo"):
            return True
        if self.algorithm == "dpo":
            return self.dpo.loss_type in REFERENCE_FREE
        if self.algorithm == "ppo":
            return self.ppo.kl_coef == 0
        return False

    @property
    def needs_reference(self) -> bool:
        enabled = self.roles.reference.enabled
        return (not self.reference_free) if enabled is None else enabled

    @property
    def needs_critic(self) -> bool:
        return self.algorithm == "ppo" and self.ppo.estimator == "gae"

    @property
    def rows_per_update(self) -> int:
        """Rows (pairs, examples, or PPO responses) behind one optimizer step."""
        if self.algorithm != "ppo":
            return self.train.global_batch_size
        rows = self.train.global_batch_size * self.roles.rollout.n_samples_per_prompt
        return rows // self.ppo.num_mini_batches

    @property
    def grad_accum_steps(self) -> int:
        per_step = self.train.micro_batch_size * self.roles.policy.resources.world_size
        return self.rows_per_update // per_step

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        for problem in _combination_problems(self):
            raise ValueError(problem)
        return self


def _combination_problems(cfg: RunConfig):
    """Yield a message for each setting that cannot work together (the first one is raised)."""
    algo, roles, train = cfg.algorithm, cfg.roles, cfg.train
    if roles.reference.enabled and cfg.reference_free:
        what = f"dpo.loss_type={cfg.dpo.loss_type}" if algo == "dpo" else f"algorithm={algo}"
        yield f"{what} uses no reference model, but roles.reference.enabled=true: remove it"
    if roles.reference.enabled is False and not cfg.reference_free:
        yield f"algorithm={algo} needs a reference model, but roles.reference.enabled=false"
    if cfg.data_format not in ALGORITHM_FORMATS[algo]:
        yield f"algorithm={algo} cannot train on data.format={cfg.data_format} (use {' or '.join(ALGORITHM_FORMATS[algo])})"
    if algo == "ppo" and roles.reward.type == "none":
        yield "algorithm=ppo needs a reward source: set roles.reward.type to model, function or http"
    if (
        algo == "ppo"
        and cfg.ppo.estimator in ("grpo", "rloo")
        and roles.rollout.n_samples_per_prompt < 2
    ):
        yield f"ppo.estimator={cfg.ppo.estimator} compares samples of the same prompt: set roles.rollout.n_samples_per_prompt >= 2"
    if (
        algo == "dpo"
        and cfg.dpo.label_smoothing > 0
        and cfg.dpo.loss_type not in ("sigmoid", "robust", "simpo")
    ):
        yield f"dpo.label_smoothing applies to sigmoid, robust and simpo losses, not {cfg.dpo.loss_type}"
    if algo == "dpo" and cfg.dpo.loss_type == "robust" and cfg.dpo.label_smoothing == 0:
        yield "dpo.loss_type=robust needs dpo.label_smoothing > 0 (the assumed label-noise rate)"
    per_step = train.micro_batch_size * roles.policy.resources.world_size
    if algo == "ppo":
        rows = train.global_batch_size * roles.rollout.n_samples_per_prompt
        if rows % cfg.ppo.num_mini_batches or (rows // cfg.ppo.num_mini_batches) % per_step:
            yield (
                f"ppo: {train.global_batch_size} prompts x {roles.rollout.n_samples_per_prompt} samples = {rows} responses "
                f"must split into ppo.num_mini_batches={cfg.ppo.num_mini_batches} mini-batches, each divisible by "
                f"train.micro_batch_size ({train.micro_batch_size}) x policy ranks ({roles.policy.resources.world_size})"
            )
    elif train.global_batch_size % per_step:
        yield (
            f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size "
            f"({train.micro_batch_size}) x policy ranks ({roles.policy.resources.world_size}) = {per_step}"
        )
    if algo == "ppo" and cfg.ppo.off_policy_correction != "none" and cfg.ppo.old_logps == "rollout":
        yield (
            f"ppo.off_policy_correction={cfg.ppo.off_policy_correction} weighs the trainer's π_old "
            "against the engine's log-probs, but ppo.old_logps=rollout makes π_old the engine's "
            "own (every weight would be 1): set ppo.old_logps=recompute"
        )
    if algo == "ppo" and cfg.ppo.dynamic_sampling:
        if roles.rollout.max_staleness:
            yield (
                "ppo.dynamic_sampling draws extra prompts until the batch is full, in the "
                "synchronous loop: set roles.rollout.max_staleness=0 (or dynamic_sampling false)"
            )
        if roles.rollout.n_samples_per_prompt < 2:
            yield "ppo.dynamic_sampling drops groups of equal rewards: set roles.rollout.n_samples_per_prompt >= 2"
    if algo == "ppo" and roles.rollout.hybrid and roles.rollout.max_staleness:
        yield (
            f"roles.rollout.max_staleness={roles.rollout.max_staleness} needs separate rollout "
            "engines: the hybrid engine samples with the trainer's own weights between its updates, "
            "so it stays synchronous (set roles.rollout.hybrid=false or max_staleness=0)"
        )
    if algo == "ppo" and roles.rollout.hybrid:
        if roles.rollout.backend == "vllm":
            yield "roles.rollout.hybrid generates with the trainer's HF model: use roles.rollout.backend hf or auto, or hybrid: false for vLLM engines"
        if train.zero_stage == 3:
            yield "roles.rollout.hybrid needs the whole weights on every policy rank: use train.zero_stage 0, 1 or 2, or hybrid: false (ZeRO-3 syncs to separate engines)"
    if cfg.model.quantization is not None and train.zero_stage == 3:
        yield "4-bit quantised models (QLoRA) cannot be sharded by ZeRO-3: use train.zero_stage 0 or 2"
    if train.offload_optimizer and train.zero_stage == 0:
        yield "train.offload_optimizer needs train.zero_stage >= 1"
    if cfg.data.packing and algo != "sft":
        yield "data.packing applies to algorithm=sft only"
    if cfg.checkpoint.resume not in ("never", "auto") and not Path(cfg.checkpoint.resume).exists():
        yield f"checkpoint.resume={cfg.checkpoint.resume!r}: no such checkpoint (use never, auto or an existing path)"


assert set(DPOConfig.model_fields["loss_type"].annotation.__args__) == PAIRED_LOSSES  # type: ignore[union-attr]


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value parsed as YAML: 0.1 -> float, [x, y] -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.lr=1e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.strip().split("."), value


def is_overlay_file(text: str) -> bool:
    """An override that names a YAML file (no '='): laid over the config as a whole."""
    return "=" not in text and text.endswith((".yaml", ".yml"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of the nested dict `raw` with each 'a.b=value' override set, in order; an
    override naming a .yaml file (e.g. a recipe's CPU twin) is merged in as a whole."""
    out = _deep_copy(raw)
    for text in overrides:
        if is_overlay_file(text):
            out = _merge(out, _yaml_load(Path(text)))
            continue
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else _not_a_section(text, part, child)
            node = child
        node[path[-1]] = value
    return out


def _not_a_section(text: str, part: str, value: Any):
    raise ConfigError(f"override {text!r}: {part!r} holds {value!r}, not a section")


def _defaults() -> dict:
    return RunConfig().model_dump(by_alias=True)


def _merge(base: dict, over: dict) -> dict:
    """`over` laid onto `base`: nested dicts merge, anything else (None too) replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _yaml_load(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def build_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a nested dict into a RunConfig, turning pydantic's errors into one clear message.

    The dict is laid over the defaults first, so that `data.train.limit=16` keeps the default
    `data.train.path` instead of replacing the whole section."""
    ppo = raw.get("ppo")
    if isinstance(ppo, dict) and ppo.get("preset") in PPO_PRESETS:
        # Before the defaults: the preset fills what the ppo section does not set itself.
        raw = {**raw, "ppo": {**PPO_PRESETS[ppo["preset"]], **ppo}}
    try:
        return RunConfig.model_validate(_merge(_defaults(), raw))
    except ValidationError as err:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in err.errors())) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (or only defaults when path is None), apply overrides, validate once."""
    raw = _yaml_load(Path(path)) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    return build_config(raw, source=str(path) if path is not None else "config")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config model that owns the field at `loc` (None when loc leaves the models)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = _section_type(field.annotation) if field else None
        if sub is None:
            return None
        model = sub
    return model


def _section_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the config schema under `model`."""
    keys = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{f.alias or name}"
        keys.append(key)
        sub = _section_type(f.annotation)
        if sub is not None:
            keys += _schema_keys(sub, key + ".")
    return keys


def _closest(given: str, valid: list[str]) -> list[str]:
    """The valid key most like `given`: by spelling, else one that is a prefix of the other."""
    close = difflib.get_close_matches(given, valid, n=1, cutoff=0.5)
    if close:
        return close
    related = [v for v in valid if given.startswith(v) or v.startswith(given)]
    return sorted(related, key=len, reverse=True)[:1]


def _describe(error: dict) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p[0].isupper()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        valid = []
        if model is not None:
            valid = [f.alias or name for name, f in model.model_fields.items()]
        prefix = ".".join(str(p) for p in loc[:-1])
        # The same name in another section first (a bare `lr` means train.lr), then spelling.
        elsewhere = sorted(
            (k for k in _schema_keys(RunConfig) if k.endswith("." + str(loc[-1]))),
            key=lambda k: (k.count("."), not k.startswith("train."), k),
        )
        close = elsewhere[:1] or [
            (prefix + "." if prefix else "") + c for c in _closest(str(loc[-1]), valid)
        ]
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown key {key!r}{hint}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] in ("value_error", "assertion_error") and not loc:
        return message
    return (
        f"{key}: {message} (got {error.get('input')!r})"
        if "input" in error and error["type"] != "value_error"
        else f"{key}: {message}"
    )


# --------------------------------------------------------------------------- dumping

_SECRET_KEY = re.compile(
    r"(^|[_-])(api_?key|key|token|secret|password|passwd|auth|authorization|credentials?|signature|sig)$",
    re.I,
)
_URL_USERINFO = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I
)
#: A query parameter of a URL (?name=value or &name=value).
_URL_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#;\s]+)=(?P<value>[^&#;\s]*)")
REDACTED = "**REDACTED**"


def redact(obj: Any) -> Any:
    """A copy with secret-looking values replaced: keys named like tokens/keys/passwords
    (but not `*_env`, which only names a variable), passwords inside URLs, and URL query
    parameters named like secrets (?api_key=, &access_token=, &key=, &sig=...)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _is_secret(k, v) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _redact_url(obj) if "://" in obj else obj
    return obj


def _redact_url(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _URL_PARAM.sub(
        lambda m: (
            f"{m['lead']}{m['name']}={REDACTED}" if _is_secret(m["name"], m["value"]) else m[0]
        ),
        text,
    )


def _is_secret(key: Any, value: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key)) and value not in (None, "")


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data (aliases such as orpo.lambda used)."""
    return cfg.model_dump(mode="json", by_alias=True)


def dump_config(cfg: RunConfig, path: str | Path | None = None) -> str:
    """YAML of the resolved config with secrets redacted; written to `path` when given."""
    text = yaml.safe_dump(redact(config_to_dict(cfg)), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text
