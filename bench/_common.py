"""What the benchmarks share: the child environment, TRL's common training arguments and
step timer, steady-state rates, and the report's small helpers."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"


def child_env(cache_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked subprocess: one thread, offline, no progress bars, a
    local Ray (RAY_ADDRESS dropped), this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        RLHF_CACHE_DIR=str(cache_dir or CACHE / "rlhf"),
        TORCH_EXTENSIONS_DIR=str(CACHE / "torch_extensions"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


#: The precisions of the benchmarks' `--precision` axis, in the order runs interleave.
PRECISIONS = ("fp32", "bf16")


def trl_training_args(
    output_dir: str, batch: int, steps: int, lr: float, precision: str = "fp32"
) -> dict:
    """TrainingArguments every TRL run shares: one optimizer step per batch, fused torch AdamW
    (HF's default on torch >= 2.8, and ours: `train.optimizer=adamw` takes the fused kernel), a
    constant lr, no gradient checkpointing (TRL's default is on), CPU, nothing saved, logged or
    evaluated inside the timed steps, seed 42.

    precision "fp32": `bf16=False`, `fp16=False` (the model computes in the fp32 it is loaded
    in). "bf16": `bf16=True`, TRL's default on bf16 hardware: accelerate's bf16 mixed
    precision, on CPU `torch.autocast("cpu", torch.bfloat16)` around the forward of the model
    as loaded (fp32 weights and AdamW state), the counterpart of ours `train.precision=bf16`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch_fused",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": precision == "bf16",
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 42,
    }


def step_timer():
    """A TrainerCallback recording train begin and each step's begin and end (perf_counter)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = 0.0
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

    return StepTimer()


def steady_rate(step_s: list[float], rows: int, warmup: int) -> float | None:
    """Rows per second over the steps after `warmup`."""
    timed = step_s[warmup:]
    return rows * len(timed) / sum(timed) if timed else None


def median(values) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def versions(packages: tuple[str, ...]) -> str:
    """'name version' of each installed package, '(not installed)' for the others."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def add_precision_argument(parser, help: str) -> None:
    """--precision: one or more of PRECISIONS (default: all), in the order given there."""
    parser.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), help=help
    )
