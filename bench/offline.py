"""Offline training throughput, side by side: this project (`rlhf train`, Ray + DeepSpeed) and
TRL 1.16, on the same work, in one invocation.

    .venv/bin/python -m bench.offline [--steps N] [--only dpo] [--repeats K]
                                      [--precision fp32 bf16]

Needs TRL (`pip install -c requirements/lock-cpu.txt -e '.[bench]'`). Workloads (`--only` takes
these names, and may be repeated):

    dpo              DPO, reference log-probs on the fly (ours: a separate reference actor)
    dpo-precomputed  DPO with precomputed reference log-probs (ours: dpo.precompute_ref_logps)
    orpo             ORPO (TRL: trl.experimental.orpo)
    sft              SFT, prompt/completion, completion-only loss, no packing (+ ours packed)
    rm               pairwise (Bradley-Terry) reward model
    dpo-smollm2      DPO on SmolLM2-135M-Instruct

Same work on both sides: the tiny Llama of `rlhf.assets.build_tiny()` (or SmolLM2), the rows
of `rlhf.data.synthetic.reviews("train")` (positive = chosen), max length 64 (prompt 32),
global batch 8 without gradient accumulation, the same precision, torch AdamW, a constant
learning rate, max_grad_norm 1, no gradient checkpointing, no eval, no checkpoint inside the
timed steps, one torch thread per process.

Precision (`--precision`, one or more of fp32 and bf16; default both) applies to `dpo` and
`dpo-smollm2`: each runs at each precision, ours with `train.precision=<p>` (bf16 on CPU:
autocast over fp32 master weights in the policy trainer, bf16 weights in the reference
actor), TRL with `bf16=True` for bf16 (its default on bf16 hardware: accelerate's autocast
over the fp32-loaded model) and `bf16=False` for fp32; within a repeat the runs alternate ours
fp32, TRL fp32, ours bf16, TRL bf16. Their rows: ours / TRL at each precision (target 1.0x),
and, when both ran, ours bf16 / ours fp32 (reported) and TRL bf16 / TRL fp32 (reported). The
other workloads run in fp32 only, whatever `--precision` says: the issue sets no bf16 target
for them, and dpo-precomputed would need one reference log-prob cache per precision (the
cache key, actors.refcache.cache_key, does not include train.precision), so a bf16 run could
read fp32 log-probs. Giving a workload the axis is `precision_axis=True` on its Workload.

Every run is its own subprocess (ours: `python -m launch train`; TRL: this module with
`--trl-worker`), so each peak RSS is that process's own.

Throughput is samples/s over the steps after `--warmup`, measured the same way on both sides:
ours from the `timing/step` column of metrics.jsonl (the coordinator's whole loop iteration:
data, reference log-probs, the train step), TRL from the interval between consecutive
`on_step_end` callbacks (data loading, the step, callbacks). With `--repeats K` the runs of a
workload are interleaved (ours, TRL, ours, TRL, ...; with the precision axis ours fp32, TRL
fp32, ours bf16, TRL bf16, ...) and the table shows medians.

The table goes to stdout and, as markdown, to bench/results/offline.md (`--out`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench._common import (
    CACHE,
    PRECISIONS,
    ROOT,
    add_precision_argument,
    child_env,
    median,
    steady_rate,
    step_timer,
    tail,
    trl_training_args,
    versions,
)

VERSIONED = ("torch", "transformers", "trl", "deepspeed", "ray", "accelerate", "datasets")

RESULT_TAG = "BENCH_RESULT "

# ----------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Ours:
    """One `rlhf train` run: a quickstart config plus overrides."""

    config: str
    overrides: tuple[str, ...] = ()
    #: RLHF_CACHE_DIR: "shared" (.cache/rlhf), "repeat" (one fresh cache per repeat, shared by
    #: the runs of that repeat: the first one fills it) or "fresh" (a new one for this run).
    cache: str = "shared"
    #: "train": `rlhf train`; "precompute": only the reference log-probs of the training set
    #: (ReferenceCache with a started reference actor, the way `rlhf train` builds it).
    mode: str = "train"
    precision: str = "fp32"  # train.precision (set per run by Workload.plan)


@dataclass(frozen=True)
class Trl:
    """One TRL run, done by `--trl-worker` in its own process."""

    trainer: str  # dpo | orpo | sft | rm
    lr: float
    precompute: bool = False
    precision: str = "fp32"  # fp32: bf16=False; bf16: bf16=True (set per run by Workload.plan)


@dataclass(frozen=True)
class Row:
    """One line of the table: run a / run b (keys of Workload.runs, usually ours / TRL), with
    a target ratio (None: report only)."""

    name: str
    a: str
    b: str
    target: float | None
    note: str = ""
    precision: str = "fp32"  # shown in the table: "fp32", "bf16" or "bf16 / fp32"


@dataclass(frozen=True)
class Workload:
    name: str
    runs: dict[str, Ours | Trl]
    rows: tuple[Row, ...]
    model: str = "tiny"
    steps: int | None = None  # default: --steps
    warmup: int | None = None  # default: --warmup
    batch: int = 8
    max_length: int = 64
    max_prompt_length: int | None = 32
    limit: int | None = None
    #: Takes `--precision`: runs and rows are written for one precision and repeated for each
    #: (keys "ours fp32", "trl bf16", ...), plus a row ours bf16 / ours fp32 when both ran.
    #: False: fp32 only, whatever `--precision` says.
    precision_axis: bool = False
    bf16_target: float | None = None  # ours bf16 / ours fp32 target, None: report only

    def plan(self, precisions: list[str]) -> tuple[dict[str, Ours | Trl], tuple[Row, ...]]:
        """The runs, in the order they run within a repeat, and the table rows."""
        if not self.precision_axis:
            return self.runs, self.rows
        runs = {
            f"{key} {p}": replace(run, precision=p)
            for p in precisions
            for key, run in self.runs.items()
        }
        rows = [
            replace(row, a=f"{row.a} {p}", b=f"{row.b} {p}", precision=p)
            for p in precisions
            for row in self.rows
        ]
        if all(p in precisions for p in PRECISIONS):
            name, both = self.rows[0].name, "bf16 / fp32"
            rows.append(Row(name, "ours bf16", "ours fp32", self.bf16_target, "", both))
            if "trl" in self.runs:  # what bf16 gives TRL, for reference
                rows.append(Row(name, "trl bf16", "trl fp32", None, "", both))
        return runs, tuple(rows)


TINY = "configs/quickstart/{}_tiny.yaml"
PRECOMPUTE = ("dpo.precompute_ref_logps=true",)

WORKLOADS = [
    Workload(
        "dpo",
        {"ours": Ours(TINY.format("dpo")), "trl": Trl("dpo", 5e-4)},
        (Row("dpo (ref on the fly)", "ours", "trl", 1.0),),
        precision_axis=True,
    ),
    Workload(
        "dpo-precomputed",
        {
            "ours-precompute": Ours(TINY.format("dpo"), PRECOMPUTE, "fresh", "precompute"),
            "ours-cold": Ours(TINY.format("dpo"), PRECOMPUTE, "repeat"),
            "trl": Trl("dpo", 5e-4),
            "ours-warm": Ours(TINY.format("dpo"), PRECOMPUTE, "repeat"),
            "trl-pre": Trl("dpo", 5e-4, precompute=True),
        },
        (
            Row(
                "dpo precomputed (cache hit) vs TRL on the fly",
                "ours-warm",
                "trl",
                1.5,
                "ours: second run, reference log-probs read from RLHF_CACHE_DIR/ref_logps",
            ),
            Row(
                "dpo precomputed (cold cache) vs TRL on the fly",
                "ours-cold",
                "trl",
                None,
                "ours: first run, the reference actor fills the cache while the policy trains",
            ),
            Row(
                "dpo precomputed (cache hit) vs TRL precomputed",
                "ours-warm",
                "trl-pre",
                None,
                "TRL: precompute_ref_log_probs=True (precompute before training, not timed)",
            ),
        ),
    ),
    Workload(
        "orpo",
        {"ours": Ours(TINY.format("orpo")), "trl": Trl("orpo", 5e-4)},
        (Row("orpo", "ours", "trl", 1.0),),
    ),
    Workload(
        "sft",
        {
            "ours": Ours(TINY.format("sft"), ("data.packing=false",)),
            "trl": Trl("sft", 1e-3),
            "ours-packed": Ours(TINY.format("sft"), ("data.packing=true",)),
        },
        (
            Row("sft (no packing)", "ours", "trl", 1.0),
            Row(
                "sft (ours packed) vs TRL unpacked",
                "ours-packed",
                "trl",
                None,
                "ours: data.packing=true packs the 8 examples of a step into fewer rows",
            ),
        ),
    ),
    Workload(
        "rm",
        {"ours": Ours(TINY.format("rm")), "trl": Trl("rm", 1e-3)},
        (Row("rm (pairwise)", "ours", "trl", None),),
    ),
    Workload(
        "dpo-smollm2",
        {"ours": Ours("configs/quickstart/dpo_smollm2.yaml"), "trl": Trl("dpo", 5e-6)},
        (
            Row(
                "dpo SmolLM2-135M (ref on the fly)",
                "ours",
                "trl",
                1.0,
                "global batch 4, max length 128",
            ),
        ),
        model="smollm2",
        steps=10,
        warmup=2,
        batch=4,
        max_length=128,
        max_prompt_length=None,
        limit=256,
        precision_axis=True,
    ),
]
BY_NAME = {w.name: w for w in WORKLOADS}


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One run's numbers (or its error)."""

    samples_per_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    error: str | None = None


#: RAY_worker_niceness for our runs (None: Ray's default, 15). Set by --ray-worker-niceness.
RAY_NICENESS: int | None = None


def _env(cache_dir: Path) -> dict[str, str]:
    nice = {} if RAY_NICENESS is None else {"RAY_worker_niceness": str(RAY_NICENESS)}
    return child_env(cache_dir, **nice)


@dataclass
class Proc:
    """A finished subprocess: exit status, output, wall time and its own peak RSS."""

    rc: int
    output: str
    wall_s: float
    peak_rss_mb: float | None

    def tagged(self) -> dict | None:
        """The JSON of the last RESULT_TAG line, if it exited cleanly."""
        lines = [x for x in self.output.splitlines() if x.startswith(RESULT_TAG)]
        return json.loads(lines[-1][len(RESULT_TAG) :]) if self.rc == 0 and lines else None

    def error(self) -> str:
        return f"rc={self.rc}: {tail(self.output)}"


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _run(cmd: list[str], env: dict[str, str], log: Path) -> Proc:
    """Run cmd from the repository root, output to `log`; poll the process's peak RSS (the
    last value read before it exits: peaks only grow)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = None
        while proc.poll() is None:
            peak = _peak_rss_mb(proc.pid) or peak
            time.sleep(0.2)
    return Proc(proc.returncode, log.read_text(), time.perf_counter() - started, peak)


def run_ours(
    w: Workload, run: Ours, steps: int, warmup: int, out_dir: Path, cache_dir: Path
) -> Result:
    overrides = [
        f"output_dir={out_dir}",
        f"train.max_steps={steps}",
        f"train.global_batch_size={w.batch}",
        f"train.micro_batch_size={w.batch}",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0.0",
        f"train.precision={run.precision}",
        "train.optimizer=adamw",
        "train.max_grad_norm=1.0",
        "logging.progress=false",
        "logging.log_every=1",
        "data.eval=null",
        "checkpoint.every_steps=null",
        f"data.max_length={w.max_length}",
        *([f"data.max_prompt_length={w.max_prompt_length}"] if w.max_prompt_length else []),
        *run.overrides,
    ]
    if run.mode == "precompute":
        spec = json.dumps({"config": run.config, "overrides": overrides})
        cmd = [sys.executable, "-m", "bench.offline", "--precompute-worker", spec]
    else:
        cmd = [sys.executable, "-m", "launch", "train", run.config, *overrides]
    proc = _run(cmd, _env(cache_dir), out_dir.with_name(out_dir.name + ".log"))
    if run.mode == "precompute":
        got = proc.tagged()
        return Result(wall_s=proc.wall_s, extra=got) if got else Result(error=proc.error())
    summary_path = out_dir / "summary.json"
    if proc.rc != 0 or not summary_path.exists():
        return Result(error=proc.error())
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x]
    step_s = [r["timing/step"] for r in sorted(rows, key=lambda r: r["step"]) if "timing/step" in r]
    rss = dict(summary.get("peak_rss_mb", {}))
    if proc.peak_rss_mb:
        rss["driver"] = [proc.peak_rss_mb]
    return Result(
        samples_per_s=steady_rate(step_s, w.batch, warmup),
        step_s=step_s,
        rss_mb=rss,
        wall_s=proc.wall_s,
        extra={"summary_samples_per_s": summary.get("samples_per_s") or float("nan")},
    )


def run_trl(w: Workload, run: Trl, steps: int, warmup: int, out_dir: Path) -> Result:
    spec = {
        "trainer": run.trainer,
        "lr": run.lr,
        "precompute": run.precompute,
        "precision": run.precision,
        "model": w.model,
        "steps": steps,
        "warmup": warmup,
        "batch": w.batch,
        "max_length": w.max_length,
        "limit": w.limit,
        "output_dir": str(out_dir),
    }
    cmd = [sys.executable, "-m", "bench.offline", "--trl-worker", json.dumps(spec)]
    proc = _run(cmd, _env(CACHE / "rlhf"), out_dir.with_name(out_dir.name + ".log"))
    got = proc.tagged()
    if got is None:
        return Result(error=proc.error())
    return Result(
        samples_per_s=got["samples_per_s"],
        step_s=got["step_s"],
        rss_mb={"trl": [got["peak_rss_mb"]]},
        wall_s=proc.wall_s,
        extra=got["extra"],
    )


def _fresh_cache(root: Path) -> Path:
    """A per-repeat RLHF_CACHE_DIR holding links to the built models but no ref_logps."""
    root.mkdir(parents=True, exist_ok=True)
    for model in (CACHE / "rlhf").glob("*-v*"):
        link = root / model.name
        if not link.exists():
            link.symlink_to(model.resolve(), target_is_directory=True)
    return root


def run_workload(w: Workload, args, work: Path) -> dict[str, list[Result]]:
    """Every run of w, `args.repeats` times, interleaved (ours, TRL, ours, TRL, ...; with the
    precision axis ours fp32, TRL fp32, ours bf16, TRL bf16, ...)."""
    steps = w.steps or args.steps
    warmup = w.warmup if w.warmup is not None else args.warmup
    runs, _ = w.plan(args.precision)
    results: dict[str, list[Result]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        cache = work / f"{w.name}-cache-{rep}"
        if any(run.cache == "repeat" for run in runs.values() if isinstance(run, Ours)):
            _fresh_cache(cache)
        for key, run in runs.items():
            slug = f"{w.name}-{key.replace(' ', '-')}"
            out = work / f"{slug}-{rep}"
            label = f"[{w.name} {rep + 1}/{args.repeats}] {key}"
            print(f"{label} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            if isinstance(run, Ours):
                if run.cache == "fresh":
                    cache_dir = _fresh_cache(work / f"{slug}-cache-{rep}")
                else:
                    cache_dir = cache if run.cache == "repeat" else CACHE / "rlhf"
                r = run_ours(w, run, steps, warmup, out, cache_dir)
            else:
                r = run_trl(w, run, steps, warmup, out)
            r.extra["load1"] = load  # 1-min load average as the run started (noise indicator)
            results[key].append(r)
            if r.error:
                shown = f"FAILED {r.error}"
            elif r.samples_per_s:
                shown = f"{r.samples_per_s:.1f} samples/s"
            else:
                shown = ", ".join(f"{k}={v:.2f}" for k, v in r.extra.items())
            print(f"{label}: {shown} (wall {r.wall_s or 0:.0f}s)", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
                out.with_name(out.name + ".log").unlink(missing_ok=True)
        if not args.keep:
            for path in work.glob(f"{w.name}-*cache-{rep}"):
                shutil.rmtree(path, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- the table


def _rate(results: list[Result]) -> float | None:
    return median([r.samples_per_s for r in results if r.error is None])


def _rss(results: list[Result], role: str) -> str:
    peaks = [max(r.rss_mb[role]) for r in results if r.error is None and r.rss_mb.get(role)]
    m = median(peaks)
    return f"{m:.0f}" if m is not None else "-"


def _rss_cell(results: list[Result]) -> str:
    """Peak RSS of a run: TRL's one process, or ours policy / reference / driver."""
    if any("trl" in r.rss_mb for r in results):
        return _rss(results, "trl")
    return " / ".join(_rss(results, role) for role in ("policy", "reference", "driver"))


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return format(x, spec) if x is not None else "failed"


def _median_step(results: list[Result], warmup: int) -> float | None:
    """Median step time over the timed steps of every repeat (robust to noise bursts)."""
    return median([s for r in results if r.error is None for s in r.step_s[warmup:]])


def table(done: dict[str, dict[str, list[Result]]], args) -> list[str]:
    """One line per row of each workload's plan: run a / run b (ours / TRL at one precision,
    or ours bf16 / ours fp32), by samples/s and by median step, against the target."""
    head = (
        "| workload | precision | a / b | a samples/s | b samples/s | a/b | a/b by median step "
        "| target | met | a peak RSS MiB | b peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * 11]
    for w in WORKLOADS:
        if w.name not in done:
            continue
        res = done[w.name]
        skip = w.warmup if w.warmup is not None else args.warmup
        for row in w.plan(args.precision)[1]:
            a, b = _rate(res[row.a]), _rate(res[row.b])
            ratio = a / b if a and b else None
            steps = _median_step(res[row.a], skip), _median_step(res[row.b], skip)
            robust = steps[1] / steps[0] if all(steps) else None
            target = f">= {row.target:.1f}x" if row.target else "report"
            met = (
                "-" if not row.target or ratio is None else ("yes" if ratio >= row.target else "NO")
            )
            lines.append(
                f"| {row.name} | {row.precision} | {row.a} / {row.b} | {_fmt(a)} | {_fmt(b)} "
                f"| {_fmt(ratio, '.2f')}x | {_fmt(robust, '.2f')}x | {target} | {met} "
                f"| {_rss_cell(res[row.a])} | {_rss_cell(res[row.b])} |"
            )
    return lines


def details(done: dict[str, dict[str, list[Result]]], warmup: int) -> list[str]:
    lines = [
        "| workload | run | samples/s per repeat | median step ms | wall s per repeat | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in done.items():
        w = BY_NAME[name]
        skip = w.warmup if w.warmup is not None else warmup
        for key, results in res.items():
            rates = ", ".join(
                "failed" if r.error else _fmt(r.samples_per_s) if r.samples_per_s else "-"
                for r in results
            )
            step = _median_step(results, skip)
            step_ms = f"{step * 1000:.0f}" if step else "-"
            walls = ", ".join(f"{r.wall_s:.0f}" for r in results if r.wall_s)
            notes = [
                f"{k}={median([r.extra.get(k) for r in results if r.error is None]):.2f}"
                for k in sorted({k for r in results for k in r.extra})
            ]
            errors = [r.error.splitlines()[-1][:120] for r in results if r.error]
            lines.append(
                f"| {name} | {key} | {rates} | {step_ms} | {walls} | "
                f"{'; '.join(notes + errors).replace('|', '/')} |"
            )
    return lines


def precompute_cost(done: dict[str, dict[str, list[Result]]]) -> list[str]:
    res = done.get("dpo-precomputed")
    if not res:
        return []
    ours = [r.extra["precompute_s"] for r in res["ours-precompute"] if r.error is None]
    trl = [r.extra["precompute_s"] for r in res["trl-pre"] if r.error is None]
    lines = []
    if ours:
        lines.append(
            f"- ours: reference log-probs of the 512 training pairs into RLHF_CACHE_DIR/ref_logps "
            f"(ReferenceCache + wait_all, reference actor already started): "
            f"median {statistics.median(ours):.2f} s"
        )
    if trl:
        lines.append(
            f"- TRL: `DPOTrainer._precompute_ref_logps` over the 512 training pairs, before "
            f"training: median {statistics.median(trl):.2f} s"
        )
    return lines


def report(done, args, load: tuple, elapsed: float) -> str:
    lines = [
        "# Offline training throughput: rlhf vs TRL",
        "",
        f"`{' '.join(['python -m bench.offline', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {elapsed / 60:.0f} min; {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} before and {load[1]:.2f} after.",
        "",
        f"{versions(VERSIONED)}.",
        "",
        "Ray worker niceness: "
        + (
            f"{RAY_NICENESS} (`--ray-worker-niceness`)."
            if RAY_NICENESS is not None
            else "Ray's default (15); the TRL process runs at niceness 0."
        ),
        "",
        f"{args.steps} steps (SmolLM2: 10), throughput over the steps after the first "
        f"{args.warmup} (SmolLM2: 2); medians of {args.repeats} interleaved repeat(s). "
        f"Precisions: {', '.join(args.precision)} (`--precision`) on the workloads with the "
        f"precision axis ({', '.join(w.name for w in WORKLOADS if w.precision_axis)}): ours "
        "`train.precision=<p>`, TRL `bf16=True` for bf16 (`bf16=False` for fp32); the others "
        "run in fp32 only. Each row compares run a with run b: ours / TRL at one precision "
        "(target: ours >= TRL), or, when both precisions ran, ours bf16 / ours fp32 and TRL "
        "bf16 / TRL fp32 (reported). samples/s = batch x timed steps / their total time, "
        "median over repeats; `met` compares a/b with the target. The ratio by median step "
        "(b's median step time / a's, over all timed steps of all repeats) is less sensitive "
        "to bursts of load. Peak RSS (MiB): ours per process (policy actor / reference actor / "
        "the `rlhf train` driver; Ray's own daemons not counted), TRL its one process (policy "
        "and reference model together).",
        "",
        *table(done, args),
        "",
    ]
    cost = precompute_cost(done)
    if cost:
        lines += ["Precompute cost (not in the samples/s above):", "", *cost, ""]
    notes = list(
        dict.fromkeys(
            f"- {w.name}: {r.name}: {r.note}"
            for w in WORKLOADS
            if w.name in done
            for r in w.plan(args.precision)[1]
            if r.note
        )
    )
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines += ["## Every run", "", *details(done, args.warmup), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- TRL worker


def trl_worker(spec: dict) -> None:
    """One TRL training run in this process; prints one RESULT_TAG line of JSON."""
    import resource

    import torch

    torch.set_num_threads(1)
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from rlhf.assets import build_tiny, prepare_smollm2
    from rlhf.data.synthetic import reviews, reviews_preset

    folder = str(build_tiny() if spec["model"] == "tiny" else prepare_smollm2())
    kind = spec["trainer"]
    fmt = "sft" if kind == "sft" else "preference"
    rows = [reviews_preset(row, fmt, i) for i, row in enumerate(reviews("train"))]
    dataset = Dataset.from_list(rows[: spec["limit"]] if spec["limit"] else rows)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    common = {
        **trl_training_args(
            spec["output_dir"], spec["batch"], spec["steps"], spec["lr"], spec["precision"]
        ),
        "max_length": spec["max_length"],
    }
    timer = step_timer()
    extra: dict[str, float] = {}
    setup = time.perf_counter()
    if kind == "dpo":

        class TimedDPOTrainer(trl.DPOTrainer):
            def _precompute_ref_logps(self, *a, **kw):
                t = time.perf_counter()
                out = super()._precompute_ref_logps(*a, **kw)
                extra["precompute_s"] = extra.get("precompute_s", 0.0) + time.perf_counter() - t
                return out

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config = trl.DPOConfig(
            **common,
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=spec["precompute"],
        )
        trainer = TimedDPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    elif kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config = ORPOConfig(**common, beta=0.1)
        trainer = ORPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    elif kind == "sft":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config = trl.SFTConfig(**common, packing=False, completion_only_loss=True)
        trainer = trl.SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    elif kind == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id
        )
        config = trl.RewardConfig(**common, center_rewards_coefficient=None)
        trainer = trl.RewardTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    else:
        raise ValueError(f"unknown TRL trainer {kind}")
    extra["setup_s"] = time.perf_counter() - setup
    trainer.train()
    # A step: from the previous step's end (data loading included) to this one's end.
    ends = [timer.start, *timer.end]
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    compute = [e - b for b, e in zip(timer.begin, timer.end, strict=True)][spec["warmup"] :]
    if compute:
        extra["compute_ms"] = 1000 * statistics.median(compute)
    result = {
        "samples_per_s": steady_rate(step_s, spec["batch"], spec["warmup"]),
        "step_s": step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "extra": extra,
        "trl": trl.__version__,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def precompute_worker(spec: dict) -> None:
    """Ours: the reference log-probs of the whole training set, as `rlhf train` computes them
    with dpo.precompute_ref_logps (a reference actor and a ReferenceCache), timed from a
    started actor to a complete, saved cache. Prints one RESULT_TAG line of JSON."""
    import ray
    import torch

    torch.set_num_threads(1)
    from actors.groups import ReferenceGroup
    from actors.offline import OfflineRun
    from actors.refcache import ReferenceCache
    from actors.run import init_ray
    from rlhf.config import load_config
    from rlhf.rundir import claim_output_dir

    cfg = load_config(Path(spec["config"]), spec["overrides"])
    run = OfflineRun(cfg, claim_output_dir(cfg))
    init_ray(cfg)
    reference = ReferenceGroup(cfg)
    try:
        reference.pids()
        started = time.perf_counter()
        cache = ReferenceCache(cfg, run.train_set, reference, run.collate, run.plan.order(0))
        cache.wait_all()
        elapsed = time.perf_counter() - started
        assert cache.path.exists(), "the cache was not written"
    finally:
        reference.shutdown()
        ray.shutdown()
    result = {"precompute_s": elapsed, "examples": float(len(run.train_set))}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.offline", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="optimizer steps per run (tiny model)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of samples/s")
    parser.add_argument(
        "--only", action="append", choices=list(BY_NAME), help="run only this workload (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians shown")
    add_precision_argument(
        parser,
        "one or more of fp32, bf16 (default: both) for the workloads with the precision "
        f"axis ({', '.join(w.name for w in WORKLOADS if w.precision_axis)}; the others run in "
        "fp32): ours train.precision=<p>, TRL bf16=True for bf16; with both, the table adds "
        "ours bf16 / ours fp32",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "offline.md",
        help="markdown report (default: bench/results/offline.md)",
    )
    parser.add_argument("--keep", type=Path, help="keep every run's output folder under this one")
    parser.add_argument(
        "--ray-worker-niceness",
        type=int,
        help="RAY_worker_niceness for our runs (default: Ray's own, 15: our actors then yield "
        "the CPU to every nice-0 process, TRL's included)",
    )
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--precompute-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return 0
    if args.precompute_worker:
        precompute_worker(json.loads(args.precompute_worker))
        return 0
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    args.precision = [p for p in PRECISIONS if p in args.precision]  # fp32 first, once each
    from rlhf.assets import build_tiny, prepare_smollm2

    global RAY_NICENESS
    RAY_NICENESS = args.ray_worker_niceness
    os.environ["RLHF_CACHE_DIR"] = str(CACHE / "rlhf")  # the models every run uses
    names = args.only or list(BY_NAME)
    build_tiny()
    if "dpo-smollm2" in names:
        prepare_smollm2()
    load0, started = os.getloadavg()[0], time.perf_counter()
    done: dict[str, dict[str, list[Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            done[name] = run_workload(BY_NAME[name], args, work)
    text = report(done, args, (load0, os.getloadavg()[0]), time.perf_counter() - started)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
