"""Where metrics go: metrics.jsonl (always), a live progress line, wandb and TensorBoard
(from the config). Secrets never reach a sink: the config they get is the redacted one."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

from rlhf.config import RunConfig, config_to_dict, redact
from rlhf.flops import ModelShape, utilisation

#: Metrics shown on the progress line when present.
HEADLINE = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rm/accuracy",
    "nll_loss",
    "sft/nll",
    "perf/policy/mfu",
)


class RolePerf:
    """Per-role utilisation (perf/<role>/tflops, perf/<role>/mfu) from the FLOPs model of
    rlhf.flops: each role's model shape and its devices' summed peak, asked of its ranks once
    at start (printed), then each step's FLOPs over the step's wall time."""

    def __init__(self, groups: dict):
        self.shapes: dict[str, ModelShape] = {}
        self.peaks: dict[str, float | None] = {}
        self.ranks: dict[str, int] = {}
        for role, group in groups.items():
            if group is None:
                continue
            infos = group.perf_info()
            if infos[0]["shape"] is None:
                continue
            peaks = [i["peak"] for i in infos]
            self.shapes[role], self.ranks[role] = infos[0]["shape"], len(infos)
            self.peaks[role] = sum(peaks) if all(peaks) else None
            peak = f"{peaks[0] / 1e12:.3g} TFLOP/s" if peaks[0] else "unknown"
            print(f"perf: {role} peak {peak} per device ({infos[0]['source']})", flush=True)

    def metrics(self, flops: dict[str, float], seconds: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, f in flops.items():
            out.update(utilisation(role, f, seconds, self.peaks.get(role), self.ranks[role]))
        return out


class MetricsLogger:
    def __init__(self, cfg: RunConfig, total_steps: int, start_step: int = 0):
        self.out = Path(cfg.output_dir)
        self.path = self.out / "metrics.jsonl"
        self.total, self.step0 = total_steps, start_step
        self._truncate_after(start_step)
        self.recent: deque[tuple[float, int]] = deque(maxlen=10)  # (time, samples) of recent logs
        self.log_every = cfg.logging.log_every
        self.bar = None
        # Not a terminal (a log file, a Ray job's logs): a plain line every ~5% of the run,
        # not a bar redrawn into the file at every step.
        self.line_every = 0
        if cfg.logging.progress and not sys.stderr.isatty():
            self.line_every = max(1, total_steps // 20)
        elif cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=1.0,
            )
        self.wandb = None
        if cfg.logging.wandb != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(self.out))
            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.logging.run_name or self.out.name,
                tags=cfg.logging.tags,
                mode=cfg.logging.wandb,
                config=redact(config_to_dict(cfg)),
                dir=str(self.out),
                resume="allow",
            )
        self.tb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard=true needs the tensorboard package "
                    "(pip install tensorboard), or set logging.tensorboard=false"
                ) from e

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows the interrupted run wrote after its last checkpoint (all of
        them when it starts from step 0), and a half-written line (a crash mid-write), said
        once."""
        if not self.path.exists():
            return
        keep, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                torn += 1
                continue
            if row is not None and step > 0 and row.get("step", step + 1) <= step:
                keep.append(line)
        if torn:
            print(f"{self.path}: dropped {torn} half-written line(s) (a crash mid-write)")
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float], samples: int = 0) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is None and not self.line_every:
            return
        # Throughput over the last few logged steps, not since start-up (model loading
        # would drag it down for the whole run).
        self.recent.append((time.perf_counter(), samples))
        shown = {_label(k): f"{metrics[k]:.4g}" for k in HEADLINE if k in metrics}
        (t0, s0), (t1, s1) = self.recent[0], self.recent[-1]
        if t1 > t0:
            shown["samples/s"] = f"{(s1 - s0) / (t1 - t0):.1f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.n = step
            self.bar.refresh()
        elif step % self.line_every == 0 or step == self.total:
            fields = "".join(f", {k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total}{fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def mean_mfu(metrics_file: Path, warmup: int = 2) -> dict[str, float]:
    """Mean of every perf/<role>/mfu (and update_mfu) over the logged steps after `warmup`,
    keyed `<role>` (`policy/update`): the summary's utilisation."""
    sums: dict[str, list[float]] = {}
    if not metrics_file.exists():
        return {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("step", 0) <= warmup:
            continue
        for key, value in row.items():
            if key.startswith("perf/") and key.endswith("mfu") and isinstance(value, float):
                role = key[len("perf/") : -len("/mfu")].replace("/update_", "/update")
                sums.setdefault(role, []).append(value)
    return {role: round(sum(v) / len(v), 4) for role, v in sums.items()}


def _label(key: str) -> str:
    """perf/policy/mfu is `mfu` on the progress line."""
    return key.rsplit("/", 1)[-1] if key.startswith("perf/") else key


def _clean(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def reduce_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Many micro-batches', updates' or ranks' metrics as one row: the mean of each key over
    the rows that have it, except keys ending in `_max`, which keep their maximum."""
    keys = {k for r in rows for k in r}
    out = {}
    for k in sorted(keys):
        values = [r[k] for r in rows if k in r]
        out[k] = max(values) if k.endswith("_max") else sum(values) / len(values)
    return out
