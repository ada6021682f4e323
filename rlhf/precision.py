"""What `train.precision` means on the device a role runs on, decided once per process.

    auto  bf16 where the hardware computes it natively: GPUs with bf16 (Ampere and newer),
          and CPUs with AVX-512 BF16 or AMX (the oneDNN kernels torch uses) for models at
          least CPU_BF16_MIN_WIDTH wide; fp32 elsewhere.
    bf16  / fp16 / fp32: as asked (fp16 only on GPU: its loss scaling is DeepSpeed's).

How each role computes under bf16:
- Trainers (policy, critic) on GPU: DeepSpeed's bf16 mode (bf16 weights in the module, fp32
  master weights and optimizer state in DeepSpeed's optimizer wrapper).
- Trainers on CPU: `torch.autocast("cpu", bfloat16)` over the fp32 module: fp32 master
  weights and AdamW state, bf16 matmuls. Measured on SmolLM2-135M-Instruct (16 x 72 tokens,
  forward + backward + fused AdamW, one thread): fp32 11.5 s, autocast 6.6 s, bf16 weights
  (what DeepSpeed's bf16 mode computes with) 6.6-7.1 s before its master-copy work, so
  autocast is the faster of the two here, and needs no second copy of the weights.
- Frozen roles (reference, reward model) and the HF rollout engine: weights held in bf16.
  Autocast would cast every weight at every call, once per decoded token in the rollout.

The trainer's and a bf16 engine's log-probs then differ slightly (the rollout's numerics are
not the trainer's): the online loop logs the gap (`rollout/logp_gap_*`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: oneDNN CPU ISA levels (ONEDNN_MAX_CPU_ISA) at or above which it runs bf16 matmuls natively.
#: A lower cap makes oneDNN emulate them: measured here, a 1024x576x1536 bf16 matmul went from
#: ~2x fp32's rate to 0.4x (AVX512_CORE) and 0.02x (AVX2).
BF16_ISAS = frozenset(
    {
        "ALL",
        "DEFAULT",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
    }
)


#: On a CPU, auto takes bf16 for models at least this wide (hidden size). Below it, casting
#: the weights and activations outweighs the faster matmuls: measured here (bench.offline,
#: DPO on the tiny Llama, hidden 128) bf16 ran at 0.48x fp32's samples/s, while SmolLM2
#: (hidden 576) trains ~1.7x and samples ~1.6x faster in bf16.
CPU_BF16_MIN_WIDTH = 512


def model_width(config) -> int | None:
    """The hidden size of an HF model config (None when it names none)."""
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and why (for the start-up log)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN below its bf16 kernels"
    if torch.cpu._is_amx_tile_supported():
        return True, "the CPU has AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "the CPU has AVX-512 BF16"
    return False, "the CPU has neither AVX-512 BF16 nor AMX"


def gpu_bf16() -> tuple[bool, str]:
    if torch.cuda.is_bf16_supported():
        return True, f"{torch.cuda.get_device_name()} supports bf16"
    return False, f"{torch.cuda.get_device_name()} has no bf16"


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device type."""

    name: str  # "fp32" | "bf16" | "fp16"
    device_type: str  # "cpu" | "cuda"
    why: str = ""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (and the weights' dtype of frozen roles)."""
        return _DTYPES[self.name]

    @property
    def autocast(self) -> bool:
        """Trainers compute under torch.autocast over fp32 weights (mixed precision on CPU)."""
        return self.name != "fp32" and self.device_type == "cpu"

    @property
    def deepspeed(self) -> str | None:
        """DeepSpeed's mixed-precision section to enable ("bf16" / "fp16"), GPU only."""
        return None if self.name == "fp32" or self.device_type == "cpu" else self.name

    def compute(self) -> contextlib.AbstractContextManager:
        """The context a trainer's forward runs in (its backward runs outside it)."""
        if self.autocast:
            return torch.autocast("cpu", dtype=self.dtype)
        return contextlib.nullcontext()

    def __str__(self) -> str:
        how = " (autocast over fp32 weights)" if self.autocast else ""
        return f"{self.name} on {self.device_type}{how}" + (f": {self.why}" if self.why else "")


def resolve_precision(
    name: str, device: str | torch.device = "cpu", width: int | None = None
) -> Precision:
    """`train.precision` on `device`, for a model `width` wide (its hidden size; None: wide
    enough). Raises ValueError for fp16 on a CPU."""
    device_type = torch.device(device).type
    on_gpu = device_type == "cuda" and torch.cuda.is_available()
    if name == "auto":
        ok, why = gpu_bf16() if on_gpu else cpu_bf16()
        if ok and not on_gpu and width is not None and width < CPU_BF16_MIN_WIDTH:
            ok = False
            why += (
                f", but the model is {width} wide (< {CPU_BF16_MIN_WIDTH}): "
                "casts cost more than bf16 saves"
            )
        return Precision("bf16" if ok else "fp32", device_type, f"auto: {why}")
    if name == "fp16" and not on_gpu:
        raise ValueError(
            "train.precision=fp16 needs a GPU (its loss scaling is DeepSpeed's); on a CPU use "
            "bf16 or auto"
        )
    if name == "bf16" and device_type == "cpu" and not (native := cpu_bf16())[0]:
        return Precision(
            name,
            device_type,
            f"as asked, but {native[1]}: oneDNN emulates bf16, far slower than fp32 "
            "(auto or fp32 would run fp32 here)",
        )
    return Precision(name, device_type)
