"""Load the models of every role from HF checkpoints, with LoRA / DoRA / QLoRA, dtype and
attention choice; merge adapters. Builtin offline models resolve through rlhf.assets.

Kinds: "causal" (policy, reference), "reward" (sequence classifier, 1 score), "classifier"
(sequence classifier, num_labels classes), "critic" (token classifier with one value per
token: the PPO value model, initialised from a reward model or a causal LM checkpoint).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch

from rlhf.assets import BUILTIN_MODELS, resolve_model_path
from rlhf.config import ConfigError, LoraConfig, ModelConfig
from rlhf.logs import warn_once
from rlhf.precision import model_width, resolve_precision

log = logging.getLogger(__name__)
# bitsandbytes warns at import, in every process, that it could not download its CPU 4-bit
# kernel (offline); plain LoRA runs never use it, and a 4-bit run says so once (load_model).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ModelKind = Literal["causal", "reward", "classifier", "critic"]


class ModelError(ConfigError):
    """A model the config names cannot be loaded as asked; the message names the key and the
    fix (raised before any actor starts, where it can be found then)."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(
    name: str,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    width: int | None = None,
) -> torch.dtype:
    """auto = bf16 on GPUs that support it, fp16 on other GPUs; on CPU fp32, or with the run's
    `precision` (train.precision: the weights of a frozen role) its compute dtype there for a
    model `width` wide: bf16 under auto on a CPU with native bf16 (rlhf.precision)."""
    if name != "auto":
        return _DTYPES[name]
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return resolve_precision(precision, device, width).dtype if precision else torch.float32


def resolve_attn(name: str, device: str | torch.device = "cpu") -> str:
    """auto = flash_attention_2 when flash-attn is installed on compute capability >= 8, else sdpa."""
    if name != "auto":
        return name
    on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if (
        on_gpu
        and importlib.util.find_spec("flash_attn")
        and torch.cuda.get_device_capability()[0] >= 8
    ):
        return "flash_attention_2"
    return "sdpa"


#: model.chat_template: builtin:NAME -> rlhf/templates/NAME.jinja (shipped with the package).
TEMPLATES = Path(__file__).with_name("templates")


def _read_template(value: str) -> str:
    """A Jinja template given inline, as a .jinja file, or as builtin:NAME."""
    if value.startswith("builtin:"):
        path = TEMPLATES / f"{value.removeprefix('builtin:')}.jinja"
        if not path.exists():
            names = ", ".join(sorted("builtin:" + p.stem for p in TEMPLATES.glob("*.jinja")))
            raise ConfigError(f"model.chat_template={value!r}: no such template (have {names})")
        return path.read_text(encoding="utf-8")
    if value.endswith(".jinja"):
        path = Path(value)
        if not path.exists():
            raise ConfigError(
                f"model.chat_template={value!r}: no such file (a path is read relative to the "
                "directory the run starts in)"
            )
        return path.read_text(encoding="utf-8")
    return value


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    """The model's tokenizer with a pad token (EOS when it has none) and the configured template."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.name_or_path)
    tok = AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    if cfg.chat_template:
        tok.chat_template = _read_template(cfg.chat_template)
    tok.padding_side = padding_side
    return tok


def _quantization(cfg: ModelConfig, dtype: torch.dtype):
    if cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    compute = dtype if q.compute_dtype == "auto" else _DTYPES[q.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_model(
    cfg: ModelConfig,
    kind: ModelKind = "causal",
    *,
    num_labels: int = 1,
    device: str | torch.device = "cpu",
    trainable: bool = True,
    pad_token_id: int | None = None,
    precision: str | None = None,
):
    """Load a model of `kind` per `cfg`; wraps it with LoRA/QLoRA when configured and trainable.
    `precision` (train.precision) decides the weights' dtype under model.dtype=auto on a CPU."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    path = resolve_model_path(cfg.name_or_path)
    width = None
    if precision and cfg.dtype == "auto":
        hf_config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        width = model_width(hf_config)
    dtype = resolve_dtype(cfg.dtype, device, precision, width)
    kwargs = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": dtype,
        "attn_implementation": resolve_attn(cfg.attn_implementation, device),
    }
    quant = _quantization(cfg, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        _say_if_4bit_kernel_missing(device)
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif kind == "critic":
        # One value per token; no dropout in the head, or values would be noisy in training.
        config = AutoConfig.from_pretrained(
            path, num_labels=1, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        config.classifier_dropout = 0.0
        # From a reward model with one score the head is kept; from a 2-class classifier (or a
        # causal LM) the value head cannot match and starts fresh.
        model = AutoModelForTokenClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True, **kwargs
        )
    else:
        labels = 1 if kind == "reward" else num_labels
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=labels, **kwargs
        )
    if kind != "causal" and model.config.pad_token_id is None and pad_token_id is not None:
        # Sequence classifiers find each row's last token through pad_token_id.
        model.config.pad_token_id = pad_token_id
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, kind)
    return model


def _say_if_4bit_kernel_missing(device) -> None:
    if torch.device(device).type != "cpu":
        return
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return
    if getattr(ops, "gemm_4bit_forward_kernel", True) is None:
        warn_once(
            log,
            "bnb-cpu-4bit",
            "4-bit matmuls on CPU take bitsandbytes' slower path: its kernel from "
            "kernels-community could not be loaded (pip install kernels, with the hub reachable)",
        )


_TASK_TYPES = {
    "causal": "CAUSAL_LM",
    "reward": "SEQ_CLS",
    "classifier": "SEQ_CLS",
    "critic": "TOKEN_CLS",
}


def apply_lora(model, lora: LoraConfig, kind: ModelKind = "causal"):
    """Wrap with a peft LoRA (or DoRA) adapter; classifier heads stay fully trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        task_type=_TASK_TYPES[kind],
    )
    return get_peft_model(model, peft_config)


def save_model(model, tokenizer, out_dir: str | Path, merge: bool = True) -> Path:
    """Save in HF format with safetensors; a peft model is merged first unless merge=False."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


#: Written next to an exported adapter: what `rlhf merge-lora` needs to rebuild its base.
ADAPTER_INFO = "rlhf_adapter.json"


def write_adapter_info(adapter_dir: str | Path, base: str, kind: str, num_labels: int) -> None:
    """The base as the config names it (a hub id, a folder, builtin:NAME), in this file and
    in peft's adapter_config.json, where peft put the folder it loaded (for a builtin, a path
    into this machine's cache); that folder is kept apart, as base_path."""
    adapter_dir = Path(adapter_dir)
    info = {"base": base, "base_path": resolve_model_path(base), "kind": kind}
    (adapter_dir / ADAPTER_INFO).write_text(
        json.dumps({**info, "num_labels": num_labels}, indent=2)
    )
    peft_file = adapter_dir / "adapter_config.json"
    if peft_file.exists():
        peft_cfg = json.loads(peft_file.read_text())
        peft_cfg["base_model_name_or_path"] = base
        peft_file.write_text(json.dumps(peft_cfg, indent=2, sort_keys=True))


def adapter_info(adapter: str | Path) -> dict:
    """Base model, model kind and label count of an adapter folder: from the file this project
    writes on export, else from peft's adapter_config.json (task type, base model name) and
    the shape of a saved classifier head."""
    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise ModelError(
            f"{path} is not a LoRA adapter folder (no adapter_config.json): give the adapter "
            "an export wrote (OUTPUT_DIR/final/adapter with checkpoint.export=adapter)"
        )
    if (path / ADAPTER_INFO).exists():
        return json.loads((path / ADAPTER_INFO).read_text())
    peft_cfg = json.loads((path / "adapter_config.json").read_text())
    task = peft_cfg.get("task_type") or "CAUSAL_LM"
    kind = {"SEQ_CLS": "classifier", "TOKEN_CLS": "critic"}.get(task, "causal")
    num_labels = 1
    weights = path / "adapter_model.safetensors"
    if kind == "classifier" and weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            heads = [
                f.get_slice(k).get_shape()[0]
                for k in f.keys()  # noqa: SIM118 (safe_open has no __iter__)
                if k.endswith(("score.weight", "classifier.weight"))
            ]
        num_labels = heads[0] if heads else 1
    return {"base": peft_cfg.get("base_model_name_or_path"), "kind": kind, "num_labels": num_labels}


def merge_lora(
    base: str | None,
    adapter: str,
    out_dir: str | Path,
    kind: ModelKind | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
) -> Path:
    """Merge a LoRA adapter into its base weights and save the merged model (safetensors).
    base, kind and num_labels default to what the adapter folder records (see adapter_info)."""
    from peft import PeftModel

    info = adapter_info(adapter)
    base = base or info["base"]
    if not base:
        raise ModelError(f"{adapter}: the adapter does not name its base model; pass --base")
    kind = kind or info["kind"]
    base_cfg = ModelConfig(name_or_path=base, trust_remote_code=trust_remote_code, dtype="float32")
    model = load_model(base_cfg, kind, num_labels=num_labels or info["num_labels"], trainable=False)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = None
    for source in (adapter, base):
        try:
            tokenizer = load_tokenizer(
                ModelConfig(name_or_path=source, trust_remote_code=trust_remote_code)
            )
            break
        except (OSError, ValueError):
            continue
    return save_model(merged, tokenizer, out_dir, merge=False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ----------------------------------------------------------------------------- checks


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub.is_offline_mode() returns a constant fixed at its
    # import, and knows nothing of transformers' TRANSFORMERS_OFFLINE.
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def model_source_problem(name: str) -> str | None:
    """Why `name` (a folder, a hub id or builtin:NAME) cannot be loaded here, or None. A hub
    id is only checked while the hub is offline: then it must be in the local cache."""
    builtins = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
    if name.startswith("builtin:"):
        if name[len("builtin:") :] in BUILTIN_MODELS:
            return None
        return f"{name!r} is not a builtin model (there are {builtins})"
    if Path(name).expanduser().exists():
        return None
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return f"{name}: no such directory (give a model folder, a hub id, or one of {builtins})"
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return (
                f"{name!r} is not a local folder, and not in the Hugging Face cache while the "
                "hub is offline (HF_HUB_OFFLINE=1): give a local folder, or download it first "
                f"(huggingface-cli download {name})"
            )
    return None


def check_model_source(key: str, name: str) -> None:
    problem = model_source_problem(name)
    if problem is not None:
        raise ModelError(f"{key}: {problem}")


def module_names(cfg: ModelConfig, kind: ModelKind = "causal") -> dict[str, bool]:
    """The module names of the model `cfg` names, each with whether it holds weights of its
    own (a layer LoRA can adapt), from a skeleton on the meta device: no weights are read,
    quick even for a 70B."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    config = AutoConfig.from_pretrained(
        resolve_model_path(cfg.name_or_path),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    auto = {
        "causal": AutoModelForCausalLM,
        "critic": AutoModelForTokenClassification,
    }.get(kind, AutoModelForSequenceClassification)
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return {
        name: any(True for _ in module.parameters(recurse=False))
        for name, module in model.named_modules()
        if name
    }


def check_lora_targets(key: str, cfg: ModelConfig, kind: ModelKind = "causal") -> None:
    """Every LoRA target and module to save is a module of the model (peft matches a name or
    a dotted suffix), so a typo is one line here instead of an actor dying at start-up."""
    lora = cfg.lora
    if lora is None:
        return
    names = module_names(cfg, kind)
    layers = sorted({n.rsplit(".", 1)[-1] for n, weighted in names.items() if weighted})
    wanted = [] if lora.target_modules == "all-linear" else list(lora.target_modules)
    for field, targets in (("target_modules", wanted), ("modules_to_save", lora.modules_to_save)):
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in names):
                raise ModelError(
                    f"{key}.lora.{field}: {target!r} is not a module of {cfg.name_or_path}; "
                    f"its layers are named {', '.join(layers)}"
                )


def check_run_models(cfg, kind: ModelKind) -> None:
    """Every model a run config names can be found here, and its LoRA targets exist in the
    policy: checked in the driver before any actor starts (cfg is a RunConfig)."""
    sources = {"model.name_or_path": cfg.model.name_or_path, "model.tokenizer": cfg.model.tokenizer}
    for role in ("reference", "reward", "critic"):
        model = getattr(cfg.roles, role).model
        if model is not None:
            sources[f"roles.{role}.model.name_or_path"] = model.name_or_path
    for key, name in sources.items():
        if name:
            check_model_source(key, name)
    check_lora_targets("model", cfg.model, kind)
