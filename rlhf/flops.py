"""A FLOPs model of each role's work and the peak of the device it runs on: utilisation
(MFU, model FLOPs utilisation) per role, the way PaLM (Chowdhery et al. 2022, appendix B)
and Megatron count it.

Per token of a sequence of T tokens, for a model whose matmul weights are `body` (every
projection a token goes through) plus `head` (the output head, applied only where logits are
computed), with `layers` layers of attention `attn_width` wide (query heads x head dim):

    forward   2 body + 2 head (where logits are computed) + 4 layers attn_width T
    training  3 x forward (the backward computes the input and the weight gradients: 2x)
    decode    one forward of one token against the cached context, so its attention term is
              4 layers attn_width (context length); the prompt is one forward (prefill)

The attention term counts the whole T x T score matrix (QKᵀ and AV, 2 FLOPs per multiply-add),
as PaLM and torch's FlopCounterMode do, though causal kernels skip about half. Only real
tokens count: padding a batch does work that this model leaves out, so it shows as lower
MFU. Embedding lookups, norms and activations are not matmuls and are not counted; LoRA
adapters' small matmuls are counted where the model has them.

Peaks: a table of dense bf16/fp16 and fp32 peaks for common GPUs; on a CPU a short matmul
probe at the compute dtype (the best of a few timed runs, cached per CPU, torch version,
dtype, thread count and oneDNN ISA cap).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelShape:
    body: int  # matmul weights every token goes through
    head: int  # output-head weights (LM head: vocab x hidden), only where logits are computed
    layers: int
    attn_width: int  # query heads x head dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        """Counted from the model's own modules: every nn.Linear (and GPT-2's Conv1D) weight;
        the output embeddings are the head."""
        head_module = (
            model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        )
        head = head_module.weight.numel() if head_module is not None else 0
        body = 0
        for module in model.modules():
            if module is head_module:
                continue
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                body += module.weight.numel()
        config = model.config
        layers = _first(config, ("num_hidden_layers", "n_layer", "num_layers")) or 0
        heads = _first(config, ("num_attention_heads", "n_head")) or 0
        width = _first(config, ("hidden_size", "n_embd", "d_model")) or 0
        head_dim = getattr(config, "head_dim", None) or (width // heads if heads else 0)
        return cls(body, head, layers, heads * head_dim)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """The same count on a model built on the meta device (no memory, no weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.of(model)


def _first(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def forward_flops(
    shape: ModelShape, lengths: Sequence[int], logits: Sequence[int] | None = None
) -> float:
    """One forward over sequences of `lengths` real tokens, with logits at `logits[i]` of row
    i's positions (default: all of them)."""
    logits = lengths if logits is None else logits
    total = 0.0
    for t, k in zip(lengths, logits, strict=True):
        total += (
            2 * shape.body * t + 2 * shape.head * k + 4 * shape.layers * shape.attn_width * t * t
        )
    return total


def train_flops(
    shape: ModelShape, lengths: Sequence[int], logits: Sequence[int] | None = None
) -> float:
    """Forward and backward (3x the forward)."""
    return 3 * forward_flops(shape, lengths, logits)


def decode_flops(shape: ModelShape, prompts: Sequence[int], responses: Sequence[int]) -> float:
    """Sampling `responses[i]` tokens after a prompt of `prompts[i]` tokens with a KV cache:
    the prefill (logits at its last position only), then one forward per further token."""
    attn = 4 * shape.layers * shape.attn_width
    total = 0.0
    for p, r in zip(prompts, responses, strict=True):
        if r <= 0:
            continue
        total += 2 * shape.body * p + 2 * shape.head + attn * p * p
        # Token j (1 <= j < r) is computed from token j-1 against p + j cached positions.
        total += (r - 1) * (2 * shape.body + 2 * shape.head) + attn * sum(
            p + j for j in range(1, r)
        )
    return total


# ----------------------------------------------------------------------------- peaks

#: Dense peak TFLOP/s per GPU (vendor data sheets, no sparsity): (bf16/fp16 tensor, fp32).
#: Matched by substring of torch.cuda.get_device_name(), first match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 70.0, 31.2),
    ("L4", 121.0, 30.3),
    ("4090", 165.2, 82.6),
    ("V100", 125.0, 15.7),
)


def gpu_peak(name: str, dtype: torch.dtype) -> float | None:
    """FLOP/s of the GPU named `name` at `dtype` (None for a GPU not in the table)."""
    for key, half, single in GPU_PEAK_TFLOPS:
        if key in name:
            return (single if dtype == torch.float32 else half) * 1e12
    return None


#: The probe's matmul: the shape of one of SmolLM2-135M's MLP projections over 1024 tokens.
PROBE_SHAPE = (1024, 576, 1536)


def cpu_probe(dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` timed matmuls of PROBE_SHAPE at `dtype` with this
    process's torch threads."""
    m, k, n = PROBE_SHAPE
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    a @ b  # warm-up (kernel selection, first-touch of the memory)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_peak(dtype: torch.dtype, cache_dir: str | Path | None = None) -> float:
    """The CPU probe's FLOP/s, measured once per machine setting and cached in
    `cache_dir`/cpu_peak.json (RLHF_CACHE_DIR, else not cached)."""
    key = "|".join(
        [
            _cpu_name(),
            torch.__version__,
            str(dtype),
            f"threads={torch.get_num_threads()}",
            os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        ]
    )
    cache_dir = cache_dir or os.environ.get("RLHF_CACHE_DIR")
    path = Path(cache_dir) / "cpu_peak.json" if cache_dir else None
    known: dict[str, float] = {}
    if path is not None and path.exists():
        try:
            known = json.loads(path.read_text())
        except ValueError:
            known = {}
    if key in known:
        return float(known[key])
    peak = cpu_probe(dtype)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        known[key] = peak
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    return peak


def device_peak(device: str | torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(FLOP/s, where it came from) of `device` computing in `dtype`."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
        peak = gpu_peak(name, dtype)
        return peak, f"{name} ({'data sheet' if peak else 'not in the peak table'})"
    where = f"CPU matmul probe, {torch.get_num_threads()} thread(s)"
    peak = cpu_peak(dtype)
    if dtype != torch.float32 and peak < (fp32 := cpu_peak(torch.float32)):
        # A CPU without native bf16 emulates it, below its fp32 rate: the hardware's best is
        # then fp32's, and an MFU over the emulated rate would read above 1.
        return fp32, (
            f"{where}: {dtype} ran at {peak / 1e9:.3g} GFLOP/s, below float32's "
            f"{fp32 / 1e9:.3g} (emulated), so the peak is float32's"
        )
    return peak, where


def utilisation(
    role: str, flops: float, seconds: float, peak: float | None, ranks: int = 1
) -> dict[str, float]:
    """perf/<role>/tflops (per device, over `seconds`) and perf/<role>/mfu (of `peak`, the
    sum of the role's devices' peaks)."""
    if seconds <= 0:
        return {}
    out = {f"perf/{role}/tflops": flops / seconds / ranks / 1e12}
    if peak:
        out[f"perf/{role}/mfu"] = flops / seconds / peak
    return out


def online_step_flops(
    shapes: dict[str, ModelShape],
    prompts: Sequence[int],
    responses: Sequence[int],
    ppo_epochs: int = 1,
    recompute: bool = False,
) -> dict[str, float]:
    """FLOPs of each role in one online step over rows with `prompts[i]` prompt and
    `responses[i]` response tokens: the rollout's decode; the reference's and the critic's
    forwards; each of the ppo_epochs updates of the policy (logits from the last prompt
    token on) and the critic; the policy's forward for π_old when `recompute`; a reward
    model's forward. Roles missing from `shapes` are left out."""
    seq = [p + r for p, r in zip(prompts, responses, strict=True)]
    logits = [r + 1 for r in responses]  # the last prompt position scores the first token
    out: dict[str, float] = {}
    if "rollout" in shapes:
        out["rollout"] = decode_flops(shapes["rollout"], prompts, responses)
    if "reference" in shapes:
        out["reference"] = forward_flops(shapes["reference"], seq, logits)
    if "policy" in shapes:
        policy = ppo_epochs * train_flops(shapes["policy"], seq, logits)
        out["policy"] = policy + (forward_flops(shapes["policy"], seq, logits) if recompute else 0)
    if "critic" in shapes:
        critic = shapes["critic"]
        out["critic"] = (3 * ppo_epochs + 1) * forward_flops(critic, seq)
    if "reward" in shapes:
        out["reward"] = forward_flops(shapes["reward"], seq)
    return out


def offline_step_flops(shapes: dict[str, ModelShape], lengths: Sequence[int]) -> dict[str, float]:
    """FLOPs of one offline step over rows of `lengths` real tokens (a preference pair is two
    rows): the policy's forward and backward, the reference's forward where it runs."""
    out = {}
    if "policy" in shapes:
        out["policy"] = train_flops(shapes["policy"], lengths)
    if "reference" in shapes:
        out["reference"] = forward_flops(shapes["reference"], lengths)
    return out
