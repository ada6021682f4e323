"""Placement plans: which node and GPUs every rank of every role gets, and how much memory each
rank needs. The plan is made before anything starts, so that a run that cannot fit is refused
with the role and the shortfall named, instead of hanging on a placement group or dying of OOM.

Pure Python (no Ray): `plan_placement(cfg)` plans against the config's declared `cluster`
section (`rlhf check`, CI); the run's start-up passes the live nodes
(`nodes_from_ray(ray.nodes())`) and actors.groups reserves the plan's bundles on exactly the
planned nodes. See docs/placement.md.

Modes (roles.placement)
    colocate      GPU roles share GPUs: rank r of a role runs on its node r // ranks_per_node
                  and local GPU r % ranks_per_node (wrapping around the node's GPUs), with its
                  fractional `gpus_per_rank`; the shares on a GPU must sum to <= 1. All shared
                  GPUs form one pool of `{"GPU": 1}` bundles, so ranks planned on one GPU get
                  the same physical GPU.
    disaggregate  every role gets GPUs of its own (ranks of one role may still share a GPU
                  when gpus_per_rank < 1); each role is a pool.
    auto          colocate when any GPU role asks for a fraction of a GPU, else disaggregate.
CPU-only roles (gpus_per_rank 0) get CPUs on the first node with room (GPU-less nodes first).

Memory estimate per rank, in bytes (`estimate_memory`). P = parameters, T = trainable
parameters, N = the role's world size, b = bytes per value of the dtype (bf16/fp16 2, fp32 4;
dtype auto = bf16 on GPU, fp32 on CPU), a = the activation dtype's bytes.
    trainers (policy, critic)   weights  = P*b  (4-bit QLoRA base: linear weights at 0.5 B +
                                           quantisation constants of 0.5 bit per weight, 0.127
                                           bit with double quant (Dettmers et al. 2023, §3);
                                           other weights at b; the adapter at T*b)
                                grads    = T*b
                                optimizer= T*(8 AdamW fp32 m+v | 2 for 8-bit AdamW)
                                           + T*4 fp32 master copy under bf16/fp16
                                ZeRO over N: stage >= 1 divides the optimizer by N, >= 2 the
                                grads too, 3 the weights too. offload_optimizer (or cpu_adam)
                                moves the optimizer bytes to host RAM.
                                e.g. 7B, bf16, full fine-tune, ZeRO-0, AdamW:
                                7e9 * (2 + 2 + 4 + 8) = 112 GB.
    LoRA                        T = r * (in + out) summed over the targeted linear layers
                                (+ out per layer for DoRA) + a sequence/token classifier head;
                                with the architecture unknown (model.num_parameters only)
                                T ~= P * r / 1600 (about 1% of P at r = 16).
    frozen (reference, reward)  weights = P*b, nothing else; plus a forward margin.
    rollout (vLLM, per engine)  on a GPU of known memory: gpu_memory_utilization x GPU memory
                                on each of its tensor_parallel_size GPUs (vLLM's budget: its
                                weights, P*b / tp per GPU, plus the KV cache); otherwise
                                weights P*b plus the KV cache of one rollout batch.
    activations (training)      L*b_tok*s*h*34*a/2 per micro-batch (Korthikanti et al. 2022,
                                eq. 2 without the s^2 score term, which sdpa/flash attention do
                                not keep); gradient checkpointing keeps 2*a/2 per layer plus one
                                full layer. Logits: b_tok*s*V*(a + 8) (fp32 log-softmax and its
                                gradient). b_tok = micro_batch_size (x2 for paired/KL rows).
    activations (forward only)  one layer (34*b_tok*s*h*a/2) + logits b_tok*s*V*(a + 4).
    KV cache                    2 * L * kv_dim * a bytes per token.
Per GPU the plan sums its ranks' shares (a TP engine's total / tp on each of its GPUs). With
roles.rollout.sleep the engines release their memory while the trainers train, so a GPU's
peak is static + max(training activations, rollout) instead of the sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import ConfigError, LoraConfig, ModelConfig, RoleResources, RunConfig

GIB = 1024**3
#: Roles in the order they are planned and printed.
ROLES = ("policy", "critic", "reference", "reward", "rollout")
_TRAINERS = ("policy", "critic")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}
#: Optimizer state bytes per trainable parameter (two moments).
_OPTIMIZER_BYTES = {
    "adamw": 8,
    "cpu_adam": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
}
_EPS = 1e-9


class PlacementError(ConfigError):
    """A placement plan that cannot fit; the message names each role and its shortfall."""


# ----------------------------------------------------------------------------- model sizes

#: Well-known hub models whose config.json is not on disk (offline CI): architecture fields
#: for `AutoConfig.for_model`, instantiated on the meta device and counted like a local one.
#: Counts: Llama-2-7b 6.74e9, Mistral-7B 7.24e9, open-calm-7b 6.87e9 (card: 6.8B),
#: open-calm-small 0.165e9 (card: 160M), gpt2 124.4e6, distilbert 67.0e6, SmolLM2-135M 134.5e6,
#: Qwen2.5-Math-1.5B 1.54e9 (card: 1.54B).
_LLAMA2_7B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
_MISTRAL_7B = {**_LLAMA2_7B, "model_type": "mistral", "intermediate_size": 14336}
_MISTRAL_7B["num_key_value_heads"] = 8
_OPEN_CALM = {
    "model_type": "gpt_neox",
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "use_parallel_residual": False,
    "tie_word_embeddings": False,
}
_SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
_QWEN25_MATH_1_5B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
KNOWN_MODELS: dict[str, dict] = {
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_MATH_1_5B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": _MISTRAL_7B,
    "cyberagent/open-calm-7b": {
        **_OPEN_CALM,
        "vocab_size": 52224,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "num_hidden_layers": 32,
    },
    "cyberagent/open-calm-small": {
        **_OPEN_CALM,
        "vocab_size": 52096,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "gpt2": {"model_type": "gpt2"},
    "openai-community/gpt2": {"model_type": "gpt2"},
    "lvwerra/gpt2-imdb": {"model_type": "gpt2"},
    "distilbert-base-uncased": {"model_type": "distilbert"},
    "distilbert/distilbert-base-uncased": {"model_type": "distilbert"},
    "lvwerra/distilbert-imdb": {"model_type": "distilbert"},
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "builtin:smollm2-135m-instruct": _SMOLLM2_135M,
}


@dataclass(frozen=True)
class ModelFacts:
    """What the memory estimate needs to know about a model (None = unknown)."""

    params: int
    source: str
    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    kv_dim: int | None = None
    #: (module name, in features, out features) of the linear layers LoRA can target
    #: (output heads excluded); None when only the parameter count is known.
    linear: tuple[tuple[str, int, int], ...] | None = None
    head_params: int = 0

    @property
    def quantizable(self) -> int:
        """Weights bitsandbytes stores in 4 bit (the linear layers except the heads)."""
        return self.params if self.linear is None else sum(i * o for _, i, o in self.linear)


def model_facts(model: ModelConfig, kind: str = "causal", key: str = "model") -> ModelFacts:
    """Parameter count and architecture of `model` loaded as `kind`, in this order: the
    explicit model.num_parameters; a local folder or builtin model's config.json; the HF
    cache; the KNOWN_MODELS table. Raises PlacementError naming `key` otherwise."""
    if model.num_parameters:
        return ModelFacts(int(model.num_parameters), f"{key}.num_parameters")
    return _facts(model.name_or_path, model.revision, model.trust_remote_code, kind, key)


@functools.lru_cache(maxsize=64)
def _facts(name: str, revision: str | None, remote_code: bool, kind: str, key: str) -> ModelFacts:
    config, source = _find_config(name, revision, remote_code)
    if config is None:
        raise PlacementError(
            f"{key}: cannot count the parameters of {name!r} (not a local folder, not in the "
            f"Hugging Face cache, not a well-known model): set {key}.num_parameters, e.g. 7.0e9"
        )
    return _count_on_meta(config, kind, source, remote_code)


def _find_config(name: str, revision: str | None, remote_code: bool):
    from transformers import AutoConfig

    if name == "builtin:tiny":
        from rlhf.assets import resolve_model_path

        name = resolve_model_path(name)
    if (Path(name) / "config.json").exists():
        return AutoConfig.from_pretrained(name, trust_remote_code=remote_code), "config.json"
    if not name.startswith("builtin:"):
        try:
            config = AutoConfig.from_pretrained(
                name, revision=revision, trust_remote_code=remote_code, local_files_only=True
            )
            return config, "cached config.json"
        except Exception:  # not cached, not a repo id, no network: try the table
            pass
    known = KNOWN_MODELS.get(name)
    if known is None:
        return None, ""
    fields = {k: v for k, v in known.items() if k != "model_type"}
    return AutoConfig.for_model(known["model_type"], **fields), "known-model table"


def _count_on_meta(config, kind: str, source: str, remote_code: bool) -> ModelFacts:
    """Instantiate on the meta device (no memory, no weights) and count."""
    import torch
    import transformers as tf

    classes = {
        "causal": tf.AutoModelForCausalLM,
        "reward": tf.AutoModelForSequenceClassification,
        "classifier": tf.AutoModelForSequenceClassification,
        "critic": tf.AutoModelForTokenClassification,
    }
    if kind in ("reward", "critic"):
        config.num_labels = 1
    extra = {"trust_remote_code": True} if remote_code else {}
    with torch.device("meta"):
        try:
            model = classes[kind].from_config(config, **extra)
        except ValueError:  # e.g. an encoder-only model asked for as a causal LM
            model = tf.AutoModel.from_config(config, **extra)
    output = model.get_output_embeddings() if kind == "causal" else None
    linear, head = [], 0
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("score", "classifier"):
            head += sum(p.numel() for p in module.parameters())
            continue
        if module is output or ".score." in f".{name}." or ".classifier." in f".{name}.":
            continue
        if isinstance(module, torch.nn.Linear):
            linear.append((name, module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
            linear.append((name, *module.weight.shape))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden else None)
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        source=source,
        hidden_size=hidden,
        num_layers=getattr(text, "num_hidden_layers", None),
        vocab_size=getattr(text, "vocab_size", None),
        kv_dim=kv_heads * head_dim if head_dim else hidden,
        linear=tuple(linear),
        head_params=head if kind != "causal" else 0,
    )


def lora_params(facts: ModelFacts, lora: LoraConfig) -> int:
    """Trainable parameters of a LoRA/DoRA adapter: r * (in + out) per targeted linear layer
    (+ out for DoRA's magnitude); about 1% of P per 16 of rank when the layers are unknown."""
    if facts.linear is None:
        return int(facts.params * lora.r / 1600)
    targets = lora.target_modules

    def hit(name: str) -> bool:
        return targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)

    return sum(lora.r * (i + o) + (o if lora.use_dora else 0) for n, i, o in facts.linear if hit(n))


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank of a role holds on its device (GPU, or host RAM for CPU ranks)."""

    role: str
    on_gpu: bool
    params: int
    trainable: int
    weights: float
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    host: float = 0.0
    """Bytes kept in host RAM beside the device (offloaded optimizer, sleeping engine)."""
    notes: str = ""

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations

    def describe(self) -> str:
        parts = [("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer)]
        parts.append(("KV cache" if self.role == "rollout" else "activations", self.activations))
        inner = " + ".join(f"{name} {_size(v)}" for name, v in parts if v)
        return f"{_size(self.total)} ({inner})" if inner else "no model"


def active_roles(cfg: RunConfig) -> list[str]:
    """The roles this run starts, in ROLES order."""
    roles = {"policy"}
    if cfg.needs_reference:
        roles.add("reference")
    if cfg.algorithm == "ppo":
        roles |= set() if cfg.roles.rollout.hybrid else {"rollout"}  # hybrid: in the policy
        roles |= {"critic"} if cfg.needs_critic else set()
        if not cfg.roles.reward.in_driver:
            roles.add("reward")
    return [r for r in ROLES if r in roles]


def role_resources(cfg: RunConfig, role: str) -> RoleResources:
    return getattr(cfg.roles, role).resources


def role_model(cfg: RunConfig, role: str) -> tuple[ModelConfig | None, str, str]:
    """(model config as the role's actor loads it, model kind, config key for messages)."""
    from rlhf.objectives import model_kind

    roles = cfg.roles
    if role == "policy":
        return cfg.model, model_kind(cfg), "model"
    if role == "reference":
        key = "roles.reference.model" if roles.reference.model else "model"
        return (roles.reference.model or cfg.model).model_copy(update={"lora": None}), "causal", key
    if role == "reward":
        return (
            (roles.reward.model if roles.reward.type == "model" else None),
            "reward",
            "roles.reward.model",
        )
    if role == "critic":
        reward = roles.reward.model if roles.reward.type == "model" else None
        model = roles.critic.model or reward or cfg.model
        key = (
            "roles.critic.model"
            if roles.critic.model
            else ("roles.reward.model" if reward else "model")
        )
        return model.model_copy(update={"quantization": None}), "critic", key
    if role == "rollout":
        return cfg.model.model_copy(update={"lora": None, "quantization": None}), "causal", "model"
    raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


def estimate_memory(cfg: RunConfig, role: str, gpu_memory: float | None = None) -> MemoryEstimate:
    """Per-rank memory of `role` (see the module docstring for the formulas). gpu_memory
    (bytes per GPU; default cluster.gpu_memory_gib) sizes the vLLM engines' budget."""
    if gpu_memory is None and cfg.cluster.gpu_memory_gib:
        gpu_memory = cfg.cluster.gpu_memory_gib * GIB
    on_gpu = role_resources(cfg, role).gpus_per_rank > 0
    model, kind, key = role_model(cfg, role)
    if model is None:
        return MemoryEstimate(role, on_gpu, 0, 0, 0.0, notes=f"reward.type={cfg.roles.reward.type}")
    facts = model_facts(model, kind, key)
    if role in _TRAINERS:
        return _trainer(cfg, role, model, facts, on_gpu)
    if role == "rollout":
        return _rollout(cfg, facts, on_gpu, gpu_memory)
    b = _DTYPE_BYTES.get(model.dtype, 2 if on_gpu else 4)
    weights = _base_weights(model, facts, b)
    acts = _forward_activations(cfg, facts, b, with_logits=kind == "causal")
    notes = f"{_count(facts.params)} params ({facts.source}), frozen, {_dtype_name(b)}"
    return MemoryEstimate(role, on_gpu, facts.params, 0, weights, activations=acts, notes=notes)


def _base_weights(model: ModelConfig, facts: ModelFacts, b: int) -> float:
    """Bytes of the base weights: b per parameter, or 4-bit linear layers under QLoRA."""
    q = model.quantization
    if q is None or not q.load_in_4bit:
        return facts.params * b
    constants = (0.127 if q.double_quant else 0.5) / 8  # bytes per weight (QLoRA paper, §3)
    quantized = facts.quantizable
    return quantized * (0.5 + constants) + (facts.params - quantized) * b


def _trainer(
    cfg: RunConfig, role: str, model: ModelConfig, facts: ModelFacts, on_gpu: bool
) -> MemoryEstimate:
    t, world = cfg.train, role_resources(cfg, role).world_size
    b = _DTYPE_BYTES.get(t.precision, 2 if on_gpu else 4)
    mixed = b == 2
    if model.lora is not None:
        trainable = lora_params(facts, model.lora) + facts.head_params
        weights = _base_weights(model, facts, b) + trainable * b
    else:
        trainable, weights = facts.params, facts.params * b
    grads = trainable * b
    optimizer = trainable * (_OPTIMIZER_BYTES.get(t.optimizer, 8) + (4 if mixed else 0))
    stage = t.zero_stage
    if stage >= 1:
        optimizer /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    host = 0.0
    if t.offload_optimizer or t.optimizer == "cpu_adam":
        host, optimizer = optimizer, 0.0
    acts = _train_activations(cfg, facts, model, b)
    notes = [f"{_count(facts.params)} params ({facts.source})", _dtype_name(b)]
    r = cfg.roles.rollout
    if role == "policy" and cfg.algorithm == "ppo" and r.hybrid:
        # The hybrid engine samples between updates: its KV cache or the update's activations.
        rows = math.ceil(cfg.train.global_batch_size * r.n_samples_per_prompt / world)
        acts = max(acts, _kv_bytes(facts, b) * rows * _seq_len(cfg))
        notes.append("hybrid rollout engine")
    if model.lora is not None:
        notes.append(f"LoRA r={model.lora.r}: {_count(trainable)} trainable")
    if model.quantization is not None:
        notes.append("4-bit base")
    notes.append(f"ZeRO-{stage} over {world}, {t.optimizer}")
    if host:
        notes.append(f"optimizer offloaded: {_size(host)} host")
    return MemoryEstimate(
        role,
        on_gpu,
        facts.params,
        trainable,
        weights,
        grads,
        optimizer,
        acts,
        host,
        ", ".join(notes),
    )


def _rollout(
    cfg: RunConfig, facts: ModelFacts, on_gpu: bool, gpu_memory: float | None
) -> MemoryEstimate:
    r = cfg.roles.rollout
    b = _DTYPE_BYTES.get(cfg.model.dtype, 2 if on_gpu else 4)
    tp = r.tensor_parallel_size if on_gpu else 1
    weights = facts.params * b
    notes = f"{_count(facts.params)} params ({facts.source}), {_dtype_name(b)}"
    if on_gpu and gpu_memory:
        budget = r.gpu_memory_utilization * gpu_memory * tp
        kv = max(budget - weights, 0.0)
        notes += f", vLLM budget {r.gpu_memory_utilization:g} x {_size(gpu_memory)} x {tp} GPU"
    else:
        engines = r.resources.world_size
        rows = math.ceil(cfg.train.global_batch_size * r.n_samples_per_prompt / engines)
        kv = _kv_bytes(facts, b) * rows * _seq_len(cfg)
        notes += f", TP {tp}" if tp > 1 else ""
    host = weights if (r.sleep and on_gpu) else 0.0
    return MemoryEstimate(
        "rollout", on_gpu, facts.params, 0, weights, activations=kv, host=host, notes=notes
    )


def _seq_len(cfg: RunConfig) -> int:
    if cfg.algorithm == "ppo":
        return cfg.data.prompt_limit + cfg.roles.rollout.max_new_tokens
    return cfg.data.max_length


def _rows_per_micro_batch(cfg: RunConfig) -> int:
    """Sequences in one forward: chosen + rejected (or KL rows) count twice."""
    paired = cfg.data_format in ("preference", "unpaired")
    return cfg.train.micro_batch_size * (2 if paired else 1)


def _train_activations(cfg: RunConfig, facts: ModelFacts, model: ModelConfig, a: int) -> float:
    h, layers, vocab = facts.hidden_size, facts.num_layers, facts.vocab_size
    if not (h and layers and vocab):
        return 0.0
    tokens = _rows_per_micro_batch(cfg) * _seq_len(cfg)
    layer = 34 * tokens * h * a / 2
    kept = (
        (layers * 2 * tokens * h * a / 2 + layer)
        if model.gradient_checkpointing
        else layers * layer
    )
    return kept + tokens * vocab * (a + 8)


def _forward_activations(cfg: RunConfig, facts: ModelFacts, a: int, with_logits: bool) -> float:
    h, vocab = facts.hidden_size, facts.vocab_size
    if not (h and vocab):
        return 0.0
    tokens = _rows_per_micro_batch(cfg) * _seq_len(cfg)
    return 34 * tokens * h * a / 2 + (tokens * vocab * (a + 4) if with_logits else 0)


def _kv_bytes(facts: ModelFacts, a: int) -> float:
    """KV-cache bytes per token."""
    if not (facts.num_layers and facts.kv_dim):
        return 0.0
    return 2 * facts.num_layers * facts.kv_dim * a


# ----------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class NodeSpec:
    """One node; math.inf = not declared (not checked)."""

    id: str
    ip: str = ""
    cpus: float = math.inf
    gpus: float = math.inf
    memory: float | None = None
    """Host memory in bytes (None = not checked)."""
    gpu_memory: float | None = None
    """Memory of each GPU in bytes (None = not checked)."""
    live: bool = False

    @property
    def name(self) -> str:
        return f"{self.id[:8]} {self.ip}" if self.live else self.id


def nodes_from_ray(ray_nodes: Iterable[dict], cluster=None) -> list[NodeSpec]:
    """NodeSpecs of the alive nodes in `ray.nodes()`; GPU memory (which Ray does not report)
    comes from cluster.gpu_memory_gib when declared."""
    gpu_memory = cluster.gpu_memory_gib * GIB if cluster and cluster.gpu_memory_gib else None
    out = []
    for n in ray_nodes:
        if not n.get("Alive", True):
            continue
        r = n.get("Resources", {})
        out.append(
            NodeSpec(
                n["NodeID"],
                n.get("NodeManagerAddress", ""),
                float(r.get("CPU", 0)),
                int(r.get("GPU", 0)),
                r.get("memory"),
                gpu_memory if r.get("GPU") else None,
                live=True,
            )
        )
    return out


def declared_nodes(cluster, count: int | None = None) -> list[NodeSpec]:
    """Nodes of a declared `cluster` section (`count` of them when cluster.nodes is null)."""
    gib = lambda v: v * GIB if v else None  # noqa: E731
    inf = lambda v: math.inf if v is None else v  # noqa: E731
    return [
        NodeSpec(
            f"node{i}",
            "",
            inf(cluster.cpus_per_node),
            inf(cluster.gpus_per_node),
            gib(cluster.memory_gib),
            gib(cluster.gpu_memory_gib),
        )
        for i in range(cluster.nodes or count or 1)
    ]


# ----------------------------------------------------------------------------- the plan


@dataclass
class RankSlot:
    """Where one rank runs: its node, GPU indices on that node (empty = CPU only), the Ray
    resources of its actor, and the placement-group bundle (pool, index) that holds it."""

    role: str
    rank: int
    node: str | None = None
    devices: tuple[int, ...] = ()
    gpus: float = 0.0
    cpus: float = 1.0
    pool: str = ""
    bundle: int = -1


@dataclass(frozen=True)
class Bundle:
    """One placement-group bundle, pinned to `node`."""

    node: str
    devices: tuple[int, ...]
    cpus: float
    gpus: float

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


@dataclass
class PlacementPlan:
    mode: str
    nodes: list[NodeSpec]
    source: str
    estimates: dict[str, MemoryEstimate]
    resources: dict[str, RoleResources]
    slots: list[RankSlot] = field(default_factory=list)
    bundles: dict[str, list[Bundle]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sleep: bool = False
    _problems: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why the plan cannot fit (empty when it can)."""
        return list(self._problems)

    def check(self) -> PlacementPlan:
        """Raise PlacementError listing every problem; returns the plan when it fits."""
        if self._problems:
            lines = "\n  - ".join(self._problems)
            raise PlacementError(f"the placement plan cannot fit ({self.source}):\n  - {lines}")
        return self

    def role_slots(self, role: str) -> list[RankSlot]:
        return [s for s in self.slots if s.role == role]

    def sync_transports(self) -> list[str]:
        """How the policy's weights reach each rollout engine (actors.weight_sync), from where
        the plan puts the sender (the policy's rank 0) and the engine: "cuda_ipc" when they
        share a GPU (NCCL refuses a communicator with two ranks on one GPU, so a colocated
        engine maps the sender's memory instead), "nccl" across GPUs, "gloo" when either side
        is on the CPU. Empty without separate engines (the hybrid engine shares the weights)."""
        policy = self.role_slots("policy")
        if not policy:
            return []
        sender = policy[0]
        out = []
        for engine in self.role_slots("rollout"):
            if not sender.devices or not engine.devices:
                out.append("gloo")
            elif engine.node == sender.node and set(engine.devices) & set(sender.devices):
                out.append("cuda_ipc")
            else:
                out.append("nccl")
        return out

    def node(self, node_id: str) -> NodeSpec:
        return next(n for n in self.nodes if n.id == node_id)

    def gpu_use(self) -> dict[tuple[str, int], dict]:
        """(node, GPU) -> {"share", "bytes" (peak), "ranks": [(role, rank, share)]}."""
        use: dict[tuple[str, int], dict] = {}
        for s in self.slots:
            if s.node is None:
                continue
            est, per = self.estimates[s.role], max(len(s.devices), 1)
            for d in s.devices:
                u = use.setdefault(
                    (s.node, d),
                    {"share": 0.0, "ranks": [], "static": 0.0, "act": 0.0, "rollout": 0.0},
                )
                u["share"] += s.gpus / per
                u["ranks"].append((s.role, s.rank, s.gpus / per))
                if s.role == "rollout":
                    u["rollout"] += est.total / per
                else:
                    u["static"] += est.static / per
                    u["act"] += est.activations / per
        for u in use.values():
            phases = (max(u["act"], u["rollout"])) if self.sleep else u["act"] + u["rollout"]
            u["bytes"] = u["static"] + phases
        return use

    def host_use(self) -> dict[str, float]:
        """node -> bytes of host RAM its ranks need (CPU ranks, offloaded state)."""
        use: dict[str, float] = {}
        for s in self.slots:
            if s.node is not None:
                est = self.estimates[s.role]
                use[s.node] = use.get(s.node, 0.0) + est.host + (0 if s.devices else est.total)
        return use

    def table(self) -> str:
        """The printable plan: role -> node -> devices -> memory estimate, then per-GPU and
        per-node totals, warnings and problems."""
        return _format_table(self)


def plan_placement(cfg: RunConfig, nodes: Sequence[NodeSpec | dict] | None = None) -> PlacementPlan:
    """Plan every rank of every role of `cfg` onto `nodes` (NodeSpecs, or the dicts of
    `ray.nodes()`); None = the config's declared `cluster` section (no Ray needed). The plan
    lists its problems instead of raising: call `.check()` to refuse one that cannot fit."""
    roles = active_roles(cfg)
    resources = {r: role_resources(cfg, r) for r in roles}
    if nodes is None:
        grow = cfg.cluster.nodes is None
        node_list = declared_nodes(cfg.cluster)
        source = "declared cluster section"
    else:
        grow = False
        node_list = [
            n if isinstance(n, NodeSpec) else nodes_from_ray([n], cfg.cluster)[0] for n in nodes
        ]
        source = f"live Ray cluster of {len(node_list)} node(s)"
    gpu_memory = next((n.gpu_memory for n in node_list if n.gpu_memory), None)
    estimates = {r: estimate_memory(cfg, r, gpu_memory) for r in roles}
    mode = cfg.roles.placement
    if mode == "auto":
        fractional = any(0 < resources[r].gpus_per_rank < 1 for r in roles)
        mode = "colocate" if fractional else "disaggregate"
    plan = PlacementPlan(mode, node_list, source, estimates, resources)
    r = cfg.roles.rollout
    plan.sleep = (
        r.sleep and "rollout" in roles and r.resources.gpus_per_rank > 0 and r.backend != "hf"
    )
    _Planner(cfg, plan, grow).run(roles)
    return plan


class _Planner:
    """Assigns ranks to nodes and GPUs, then collects the problems of the result."""

    def __init__(self, cfg: RunConfig, plan: PlacementPlan, grow: bool):
        self.cfg, self.plan, self.grow = cfg, plan, grow
        self.owner: dict[tuple[str, int], str] = {}  # (node, GPU) -> role (disaggregate)
        self.cpus_used: dict[str, float] = {}
        self.problem = plan._problems.append

    def run(self, roles: list[str]) -> None:
        gpu_roles = [r for r in roles if self.plan.resources[r].gpus_per_rank > 0]
        for role in gpu_roles:
            if self._role_ok(role):
                if self.plan.mode == "colocate":
                    self._colocate(role)
                else:
                    self._disaggregate(role)
        for role in roles:
            if role not in gpu_roles:
                self._cpu_only(role)
        self.plan.slots.sort(key=lambda s: (ROLES.index(s.role), s.rank))
        self._bundles()
        self._check_nodes()
        self._check_gpus()
        self._check_sync()
        if self.cfg.roles.rollout.sleep and "rollout" in roles and not self.plan.sleep:
            self.plan.warnings.append(
                "roles.rollout.sleep applies to vLLM engines on GPUs; ignored"
            )

    # ---------------------------------------------------------------- per role

    def _devices_per_rank(self, role: str) -> int:
        res = self.plan.resources[role]
        if role == "rollout":
            return self.cfg.roles.rollout.tensor_parallel_size
        return max(1, int(res.gpus_per_rank))

    def _role_ok(self, role: str) -> bool:
        """Structural checks that need no cluster; False = the role cannot be placed."""
        res, tp = self.plan.resources[role], self.cfg.roles.rollout.tensor_parallel_size
        if role != "rollout" and res.gpus_per_rank > 1:
            self.problem(
                f"roles.{role}: gpus_per_rank={res.gpus_per_rank:g}, but a {role} rank drives one "
                f"GPU: use ranks_per_node={int(res.gpus_per_rank) * res.ranks_per_node} (data parallel) instead"
            )
            return False
        if role == "rollout" and tp > 1 and res.gpus_per_rank != tp:
            self.problem(
                f"roles.rollout: tensor_parallel_size={tp} needs gpus_per_rank={tp} (whole GPUs for each "
                f"engine), got {res.gpus_per_rank:g}"
            )
            return False
        most = max((n.gpus for n in self.plan.nodes), default=0)
        d = self._devices_per_rank(role)
        if most == 0:
            self.problem(
                f"roles.{role}: gpus_per_rank={res.gpus_per_rank:g}, but the cluster has no GPUs"
            )
            return False
        if d > most:
            self.problem(
                f"roles.{role}: tensor_parallel_size={d} > {most:g} GPUs per node (the GPUs of an "
                "engine must be on one node)"
            )
            return False
        return True

    def _gpu_nodes(self) -> list[NodeSpec]:
        return [n for n in self.plan.nodes if n.gpus > 0]

    def _new_node(self) -> NodeSpec:
        node = declared_nodes(self.cfg.cluster, len(self.plan.nodes) + 1)[-1]
        self.plan.nodes.append(node)
        return node

    def _colocate(self, role: str) -> None:
        res, d = self.plan.resources[role], self._devices_per_rank(role)
        nodes = self._gpu_nodes()
        while self.grow and len(nodes) < res.num_nodes:
            nodes.append(self._new_node())
        if res.num_nodes > len(nodes):
            self.problem(
                f"roles.{role}: num_nodes={res.num_nodes}, but the cluster has {len(nodes)} node(s) with GPUs"
            )
            return
        for rank in range(res.world_size):
            node, local = nodes[rank // res.ranks_per_node], rank % res.ranks_per_node
            count = node.gpus if math.isfinite(node.gpus) else math.inf
            devices = tuple(int((local * d + j) % count) for j in range(d))
            self._add(RankSlot(role, rank, node.id, devices, res.gpus_per_rank, res.cpus_per_rank))

    def _disaggregate(self, role: str) -> None:
        res, d = self.plan.resources[role], self._devices_per_rank(role)
        per_gpu = 1 if d > 1 else max(1, int(1 / res.gpus_per_rank + _EPS))
        need_gpus = d * math.ceil(res.ranks_per_node / per_gpu)
        need_cpus = res.ranks_per_node * res.cpus_per_rank
        used: set[str] = set()
        for k in range(res.num_nodes):
            node, free = self._find(need_gpus, need_cpus, used)
            if node is None:
                self.problem(
                    f"roles.{role}: no node has {need_gpus} free GPU(s) and {need_cpus:g} free CPU(s) for "
                    f"{res.ranks_per_node} rank(s) (node {k + 1} of num_nodes={res.num_nodes}); free: {self._free_summary()}"
                )
                return
            used.add(node.id)
            for dev in free[:need_gpus]:
                self.owner[(node.id, dev)] = role
            for local in range(res.ranks_per_node):
                first = (local // per_gpu) * d
                devices = tuple(free[first : first + d])
                rank = k * res.ranks_per_node + local
                self._add(
                    RankSlot(role, rank, node.id, devices, res.gpus_per_rank, res.cpus_per_rank)
                )

    def _cpu_only(self, role: str) -> None:
        res = self.plan.resources[role]
        need = res.ranks_per_node * res.cpus_per_rank
        used: set[str] = set()
        for k in range(res.num_nodes):
            node, _ = self._find(0, need, used, prefer_cpu=True)
            if node is None:
                self.problem(
                    f"roles.{role}: no node has {need:g} free CPU(s) for {res.ranks_per_node} rank(s) "
                    f"(node {k + 1} of num_nodes={res.num_nodes}); free: {self._free_summary()}"
                )
                return
            used.add(node.id)
            for local in range(res.ranks_per_node):
                rank = k * res.ranks_per_node + local
                self._add(RankSlot(role, rank, node.id, (), 0.0, res.cpus_per_rank))

    def _find(self, gpus: int, cpus: float, exclude: set[str], prefer_cpu: bool = False):
        """First node (not in exclude) with `gpus` unowned GPUs and `cpus` free CPUs."""
        order = sorted(self.plan.nodes, key=lambda n: n.gpus > 0) if prefer_cpu else self.plan.nodes
        fresh = declared_nodes(self.cfg.cluster, len(self.plan.nodes) + 1)[-1]
        for node in [*order, *([fresh] if self.grow else [])]:
            if node.id in exclude or node.cpus - self.cpus_used.get(node.id, 0) < cpus - _EPS:
                continue
            limit = int(node.gpus) if math.isfinite(node.gpus) else len(self.owner) + gpus
            free = [i for i in range(limit) if (node.id, i) not in self.owner]
            if len(free) >= gpus:
                if node is fresh:
                    self.plan.nodes.append(fresh)
                return node, free
        return None, []

    def _free_summary(self) -> str:
        parts = []
        for n in self.plan.nodes:
            gpus = (
                sum(1 for i in range(int(n.gpus)) if (n.id, i) not in self.owner)
                if math.isfinite(n.gpus)
                else math.inf
            )
            parts.append(f"{n.name}: {gpus:g} GPU, {n.cpus - self.cpus_used.get(n.id, 0):g} CPU")
        return "; ".join(parts)

    def _add(self, slot: RankSlot) -> None:
        self.plan.slots.append(slot)
        self.cpus_used[slot.node] = self.cpus_used.get(slot.node, 0) + slot.cpus

    # ---------------------------------------------------------------- bundles and checks

    def _bundles(self) -> None:
        """GPU ranks: one bundle per distinct (node, GPUs) in their pool (colocated GPUs: one
        shared pool); CPU-only ranks: a bundle each, in their role's pool."""
        index: dict[tuple, int] = {}
        for s in self.plan.slots:
            if s.node is None:
                continue
            shared = bool(s.devices) and self.plan.mode == "colocate"
            s.pool = "colocated" if shared else s.role
            key = (s.pool, s.node, s.devices) if s.devices else (s.pool, s.role, s.rank)
            bundles = self.plan.bundles.setdefault(s.pool, [])
            if key not in index:
                index[key] = len(bundles)
                bundles.append(Bundle(s.node, s.devices, 0.0, float(len(s.devices))))
            s.bundle = index[key]
            b = bundles[s.bundle]
            bundles[s.bundle] = Bundle(b.node, b.devices, b.cpus + s.cpus, b.gpus)

    def _check_nodes(self) -> None:
        for node in self.plan.nodes:
            on = [s for s in self.plan.slots if s.node == node.id]
            cpus = sum(s.cpus for s in on)
            if cpus > node.cpus + _EPS:
                self.problem(
                    f"node {node.name}: its ranks need {cpus:g} CPUs ({_by_role(on, 'cpus')}), it has {node.cpus:g}"
                )
        for node_id, used in self.plan.host_use().items():
            node = self.plan.node(node_id)
            if node.memory and used > node.memory:
                roles = sorted({s.role for s in self.plan.slots if s.node == node_id})
                msg = f"node {node.name}: host memory {_size(used)} estimated ({', '.join(roles)}) > {_size(node.memory)}"
                (self.plan.warnings if node.live else self.plan._problems).append(msg)

    def _check_gpus(self) -> None:
        for (node_id, dev), u in sorted(self.plan.gpu_use().items()):
            node, where = self.plan.node(node_id), f"node {self.plan.node(node_id).name} GPU {dev}"
            ranks = ", ".join(f"{r}[{k}] {sh:.2g}" for r, k, sh in u["ranks"])
            tp_engine = (
                any(r == "rollout" for r, *_ in u["ranks"])
                and self._devices_per_rank("rollout") > 1
            )
            if tp_engine and len(u["ranks"]) > 1:
                self.problem(
                    f"{where}: roles.rollout with tensor_parallel_size > 1 takes whole GPUs, which "
                    f"cannot be shared ({ranks}): use roles.placement=disaggregate or tensor_parallel_size=1"
                )
            elif u["share"] > 1 + 1e-6:
                self.problem(f"{where}: GPU shares sum to {u['share']:.2f} > 1 ({ranks})")
            if node.gpu_memory and u["bytes"] > node.gpu_memory:
                roles = " + ".join(f"roles.{r}" for r in dict.fromkeys(r for r, *_ in u["ranks"]))
                self.problem(
                    f"{roles} on {where}: {_size(u['bytes'])} estimated "
                    f"({_by_role_bytes(self.plan, node_id, dev)}) > {_size(node.gpu_memory)} of GPU memory"
                )
        rollout = self.plan.estimates.get("rollout")
        gpu_memory = next((n.gpu_memory for n in self.plan.nodes if n.gpu_memory), None)
        if rollout is not None and rollout.on_gpu and gpu_memory:
            self._check_vllm_budget(rollout, gpu_memory)

    def _check_sync(self) -> None:
        """The NCCL weight-sync communicator (the policy's rank 0 and the engines not on its
        GPU) may hold one rank per GPU."""
        engines = self.plan.role_slots("rollout")
        if not engines or not self.plan.role_slots("policy"):
            return  # nothing to sync, or a role that could not be planned (said already)
        nccl = [e for e, t in zip(engines, self.plan.sync_transports(), strict=True) if t == "nccl"]
        if not nccl:
            return
        holders: dict[tuple[str | None, int], list[str]] = {}
        for slot in (self.plan.role_slots("policy")[0], *nccl):
            for dev in slot.devices:
                holders.setdefault((slot.node, dev), []).append(f"{slot.role}[{slot.rank}]")
        for (node, dev), ranks in sorted(holders.items(), key=str):
            if len(ranks) > 1:
                self.problem(
                    f"node {self.plan.node(node).name if node else '?'} GPU {dev}: "
                    f"{' and '.join(ranks)} would be two ranks of one NCCL weight-sync "
                    "communicator on one GPU, which NCCL refuses: give each engine a GPU of its "
                    "own, or put it on the GPU of policy rank 0 (synced through CUDA IPC)"
                )

    def _check_vllm_budget(self, est: MemoryEstimate, gpu_memory: float) -> None:
        r = self.cfg.roles.rollout
        per_gpu = est.weights / r.tensor_parallel_size
        budget = r.gpu_memory_utilization * gpu_memory
        if per_gpu > budget:
            self.problem(
                f"roles.rollout: weights {_size(per_gpu)} per GPU exceed vLLM's budget of "
                f"gpu_memory_utilization {r.gpu_memory_utilization:g} x {_size(gpu_memory)} = "
                f"{_size(budget)}: raise gpu_memory_utilization or tensor_parallel_size"
            )


def _by_role(slots: list[RankSlot], attr: str) -> str:
    totals: dict[str, float] = {}
    for s in slots:
        totals[s.role] = totals.get(s.role, 0) + getattr(s, attr)
    return ", ".join(f"{r} {v:g}" for r, v in totals.items())


def _by_role_bytes(plan: PlacementPlan, node_id: str, dev: int) -> str:
    totals: dict[str, float] = {}
    for s in plan.slots:
        if s.node == node_id and dev in s.devices:
            totals[s.role] = totals.get(s.role, 0) + plan.estimates[s.role].total / len(s.devices)
    return " + ".join(f"{r} {_size(v)}" for r, v in totals.items())


# ----------------------------------------------------------------------------- printing


def _size(v: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    if v < GIB:
        return f"{v / 2**20:.1f} MiB"
    return f"{v / GIB:.2f} GiB" if v < 10 * GIB else f"{v / GIB:.1f} GiB"


def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _dtype_name(b: int) -> str:
    return "16-bit" if b == 2 else "fp32"


def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _format_table(plan: PlacementPlan) -> str:
    rows = [("role", "ranks", "node", "devices", "gpus/rank", "cpus/rank", "memory/rank")]
    groups: dict[tuple, list[RankSlot]] = {}
    for s in plan.slots:
        groups.setdefault((s.role, s.node, s.devices), []).append(s)
    merged: dict[tuple, list[RankSlot]] = {}
    for (role, node, devices), slots in groups.items():
        merged.setdefault((role, node, bool(devices)), []).extend(slots)
    for (role, node, _), slots in merged.items():
        devs = sorted({d for s in slots for d in s.devices})
        rows.append(
            (
                role,
                _ranges([s.rank for s in slots]),
                plan.node(node).name,
                f"gpu{_ranges(devs)}" if devs else "cpu",
                f"{slots[0].gpus:g}",
                f"{slots[0].cpus:g}",
                plan.estimates[role].describe()
                + (f" over {len(slots[0].devices)} GPUs" if len(slots[0].devices) > 1 else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"placement plan: {plan.mode}, {plan.source}; {_nodes_summary(plan)}"]
    lines += [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in rows
    ]
    lines += [f"  {role}: {est.notes}" for role, est in plan.estimates.items()]
    use = plan.gpu_use()
    alike: dict[tuple, list[int]] = {}  # GPUs of a node that hold the same roles and bytes
    for (node_id, dev), u in sorted(use.items()):
        roles = " + ".join(dict.fromkeys(r for r, *_ in u["ranks"]))
        alike.setdefault((node_id, roles, f"{u['share']:.2f}", _size(u["bytes"])), []).append(dev)
    for (node_id, roles, share, size), devs in alike.items():
        node = plan.node(node_id)
        cap = f" of {_size(node.gpu_memory)}" if node.gpu_memory else ""
        each = " each" if len(devs) > 1 else ""
        lines.append(
            f"  GPU {node.name} gpu{_ranges(devs)}: share {share}, {size}{cap}{each} ({roles})"
        )
    if use and not any(plan.node(n).gpu_memory for n, _ in use):
        lines.append("  GPU memory not checked: set cluster.gpu_memory_gib")
    lines += [f"  warning: {w}" for w in plan.warnings]
    if plan.problems():
        lines.append("  CANNOT FIT:")
        lines += [f"    - {p}" for p in plan.problems()]
    return "\n".join(lines)


def _nodes_summary(plan: PlacementPlan) -> str:
    def one(n: NodeSpec) -> str:
        gpu = f"{n.gpus:g} GPU" + (f" x {_size(n.gpu_memory)}" if n.gpu_memory else "")
        return f"{n.name} ({n.cpus:g} CPU, {gpu})".replace("inf", "any")

    return f"{len(plan.nodes)} node(s): " + ", ".join(one(n) for n in plan.nodes)
