"""Online RL throughput: where the time of this project's online loop goes, and GRPO / RLOO
side by side with TRL 1.16, in fp32 and bf16, in one invocation.

    .venv/bin/python -m bench.online [--only NAME] [--precision fp32 bf16] [--steps N]
                                     [--repeats K] [--wait-idle]

Workloads (`--only` takes these names, and may be repeated):

    tiny-ppo       ours only: PPO with a critic (GAE), tiny Llama, 32 prompts x 1 sample
    tiny-grpo      GRPO, tiny Llama, 8 prompts x 4 samples; TRL: GRPOTrainer
    tiny-rloo      RLOO, tiny Llama, 8 prompts x 4 samples; TRL: RLOOTrainer
    tiny-rloo-engine-logps  tiny-rloo with ppo.old_logps=rollout (report only); TRL: RLOOTrainer
    tiny-grpo-hybrid  tiny-grpo with roles.rollout.hybrid (rollout in the policy actor)
    tiny-rloo-hybrid  tiny-rloo with roles.rollout.hybrid
    smollm2-ppo    ours only: PPO with a critic, SmolLM2-135M-Instruct, 16 prompts x 1 sample
    smollm2-grpo   GRPO, SmolLM2-135M-Instruct, chat prompts, 4 prompts x 4 samples x 32 new
                   tokens, two micro-batches of 8 (the quickstart's shape); TRL: GRPOTrainer
    smollm2-grpo-async1, smollm2-grpo-async2
                   ours only: smollm2-grpo with roles.rollout.max_staleness 1 / 2 and
                   ppo.off_policy_correction=tis, compared with smollm2-grpo's TRL runs and
                   our synchronous ones (run it in the same invocation)

Precision (`--precision`, one or more of fp32 and bf16; default both): every workload runs at
each, ours with `train.precision=<p>` (bf16 on CPU: autocast over fp32 master weights in the
trainers, bf16 weights in the reference and the HF rollout engine), TRL with `bf16=True` for
bf16 (its default on bf16 hardware: accelerate's autocast over the fp32-loaded model) and
`bf16=False` for fp32. Within a repeat the runs of a workload alternate: ours fp32, TRL fp32,
ours bf16, TRL bf16.

The comparison table has one row per workload and precision, ours / TRL at that precision
(target: ours >= TRL, 1.0x, on the rows with a TRL peer and a target), and, when both
precisions ran, `ours bf16 / ours fp32` per workload (target 1.8x on the SmolLM2 workloads,
reported on the tiny ones) and `trl bf16 / trl fp32` (reported). All are ratios of median
samples/s over the repeats.

Ours is `python -m launch train CONFIG output_dir=... logging.progress=false ...` in a
subprocess; the phase table (per workload and precision) shows the mean of metrics.jsonl's
timing/rollout, timing/make_experience, timing/train, timing/sync, timing/step and
perf/tokens_per_s over the steps after `--warmup`, perf/policy/mfu and perf/rollout/mfu where
the run logs them ('-' where not), and summary.json's samples_per_s (responses/s after 2
warm-up steps). TRL runs in its own subprocess (this module with `--trl-worker`), timed by a
TrainerCallback: a step is the interval between consecutive on_step_end calls (generation,
reward, reference log-probs and the optimizer step all happen inside it).

Same work on both sides: the model folder, the reward (`rlhf.rewards:vader_sentiment`), the
prompts (`rlhf.data.synthetic.reviews("train")`, as a user message through the chat template
for SmolLM2), samples per prompt, max new tokens, prompts per step, micro-batch size,
temperature 1.0, lr, KL coefficient 0.05, one optimizer step per generation batch, the
precision of the row, torch AdamW, constant lr, max_grad_norm 1, one torch thread per
process. With `--repeats K` the runs are interleaved and the tables show medians.

The tables go to stdout and, as markdown, to bench/results/online.md (`--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dataclasses import dataclass, field
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

VERSIONED = ("torch", "transformers", "trl", "deepspeed", "ray", "accelerate")

RESULT_TAG = "BENCH_RESULT "
REWARD = "rlhf.rewards:vader_sentiment"
KL_COEF = 0.05
#: Other work that makes timings meaningless on this 2-core machine (`--wait-idle`).
BUSY_PATTERN = "launch train|bench.offline|pytest"
#: Niceness of the TRL process. Ray starts our actors at niceness 15 (RAY_worker_niceness), so
#: by default TRL runs at 15 too: on a loaded machine both sides then yield alike.
TRL_NICENESS = 15
PHASES = (
    "timing/rollout",
    "timing/make_experience",
    "timing/train",
    "timing/sync",
    "timing/step",
    "perf/tokens_per_s",
)
#: Roles whose model FLOP utilisation is a column of the phase table (perf/<role>/mfu).
MFU_ROLES = ("policy", "rollout")
#: Per-role perf metrics averaged like the phases when metrics.jsonl has them:
#: perf/<role>/mfu, perf/<role>/tflops, perf/<role>/busy (the run list shows them all).
PERF_SUFFIXES = ("/mfu", "/tflops", "/busy")
#: timing/idle/<role>: seconds of the step the role's actors ran no call (their own table).
IDLE = "timing/idle/"
IDLE_ROLES = ("policy", "rollout", "reference", "critic", "reward")

# ----------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "tiny" | "smollm2"
    estimator: str  # ppo.estimator: gae | grpo | rloo
    prompts: int  # prompts per step (train.global_batch_size; TRL: generation batch / n)
    samples: int  # samples per prompt (n_samples_per_prompt; TRL: num_generations)
    max_new_tokens: int
    micro: int  # train.micro_batch_size (ours)
    lr: float
    trl: str | None = None  # TRL peer: "grpo" | "rloo" | None (ours only)
    target: float | None = None  # ours/TRL target at equal precision, None: report only
    bf16_target: float | None = None  # ours bf16 / ours fp32 target, None: report only
    chat: bool = False  # data.chat_prompts (TRL: conversational prompts)
    #: Where the KL goes, as TRL's trainer does it: GRPOTrainer adds β·k3 to the loss,
    #: RLOOTrainer subtracts β·k1 (summed over the sequence) from the reward.
    kl_penalty: str = "reward"
    kl_estimator: str = "k1"
    old_logps: str = "recompute"  # ppo.old_logps
    hybrid: bool = False  # roles.rollout.hybrid: the policy's actor generates, no weight sync
    #: roles.rollout.max_staleness (async: the engines sample up to k batches ahead), with
    #: ppo.off_policy_correction=tis when k > 0.
    max_staleness: int = 0
    #: An async variant of this synchronous workload: compared with its ours runs (target
    #: `sync_target`) and with its TRL runs (target `target`), which it does not repeat.
    sync_of: str | None = None
    sync_target: float | None = None

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


GRPO_KL = {"kl_penalty": "loss", "kl_estimator": "k3"}
WORKLOADS = [
    Workload("tiny-ppo", "tiny", "gae", 32, 1, 16, 32, 1e-5),
    Workload("tiny-grpo", "tiny", "grpo", 8, 4, 16, 32, 1e-5, trl="grpo", target=1.0, **GRPO_KL),
    Workload("tiny-rloo", "tiny", "rloo", 8, 4, 16, 32, 1e-5, trl="rloo", target=1.0),
    # RLOO taking π_old for the KL from the HF engine instead of a policy forward (TRL
    # recomputes it): an option of ours, so reported beside the target row, not as it.
    Workload(
        "tiny-rloo-engine-logps",
        "tiny",
        "rloo",
        8,
        4,
        16,
        32,
        1e-5,
        trl="rloo",
        old_logps="rollout",
    ),
    # The hybrid engine: generation in the policy's own actor, with its weights (no sync).
    Workload(
        "tiny-grpo-hybrid",
        "tiny",
        "grpo",
        8,
        4,
        16,
        32,
        1e-5,
        trl="grpo",
        target=1.0,
        hybrid=True,
        **GRPO_KL,
    ),
    Workload(
        "tiny-rloo-hybrid", "tiny", "rloo", 8, 4, 16, 32, 1e-5, trl="rloo", target=1.0, hybrid=True
    ),
    Workload("smollm2-ppo", "smollm2", "gae", 16, 1, 32, 8, 1e-5, chat=True, bf16_target=1.8),
    # The quickstart's shape (launch/quickstart.yaml): 16 responses, two micro-batches of 8.
    Workload(
        "smollm2-grpo",
        "smollm2",
        "grpo",
        4,
        4,
        32,
        8,
        1e-5,
        trl="grpo",
        target=1.0,
        bf16_target=1.8,
        chat=True,
        **GRPO_KL,
    ),
]
# Asynchronous variants of the quickstart's shape (issue targets: k=1 >= 1.5x TRL, >= 1.4x
# ours synchronous).
WORKLOADS += [
    dataclasses.replace(
        sync,
        name=f"smollm2-grpo-async{k}",
        trl=None,
        target=1.5 if k == 1 else None,
        bf16_target=None,
        max_staleness=k,
        sync_of="smollm2-grpo",
        sync_target=1.4 if k == 1 else None,
    )
    for sync in [next(w for w in WORKLOADS if w.name == "smollm2-grpo")]
    for k in (1, 2)
]
BY_NAME = {w.name: w for w in WORKLOADS}


def ours_config(w: Workload, steps: int, precision: str = "fp32") -> dict:
    """The run config of our side at `train.precision=precision` (the output dir comes as an
    override)."""
    return {
        "algorithm": "ppo",
        "model": {
            "name_or_path": f"builtin:{'tiny' if w.model == 'tiny' else 'smollm2-135m-instruct'}"
        },
        "data": {
            "train": {"path": "builtin:reviews", "split": "train"},
            "max_length": 128,
            "chat_prompts": w.chat,
        },
        "train": {
            "global_batch_size": w.prompts,
            "micro_batch_size": w.micro,
            "lr": w.lr,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "precision": precision,
            "optimizer": "adamw",
            "max_grad_norm": 1.0,
            "max_steps": steps,
            "seed": 42,
        },
        "roles": {
            "reward": {"type": "function", "function": REWARD},
            "rollout": {
                "backend": "hf",
                "max_new_tokens": w.max_new_tokens,
                "temperature": 1.0,
                "n_samples_per_prompt": w.samples,
                "hybrid": w.hybrid,
                "max_staleness": w.max_staleness,
            },
        },
        "ppo": {
            "estimator": w.estimator,
            "kl_coef": KL_COEF,
            "kl_penalty": w.kl_penalty,
            "kl_estimator": w.kl_estimator,
            "old_logps": w.old_logps,
            "off_policy_correction": "tis" if w.max_staleness else "none",
            "ppo_epochs": 1,
            "num_mini_batches": 1,
        },
        "checkpoint": {"every_steps": None},
        "logging": {"log_every": 1, "progress": False},
    }


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One run's numbers (or its error)."""

    samples_per_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # ours: means after warm-up
    extra: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    error: str | None = None


def _run(cmd: list[str], log: Path) -> tuple[int, str, float]:
    """Run cmd from the repository root with output to `log`: (exit status, output, wall s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(
            cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        ).returncode
    return rc, log.read_text(), time.perf_counter() - started


def _means(rows: list[dict]) -> dict[str, float]:
    """Means over the timed metrics rows: each phase every row has, and each
    perf/<role>/{mfu,tflops,busy} over the rows that have it (logged by newer runs only)."""
    means = {
        k: statistics.fmean(r[k] for r in rows)
        for k in PHASES
        if rows and all(k in r for r in rows)
    }
    perf = {k for r in rows for k in r if k.startswith("perf/") and k.endswith(PERF_SUFFIXES)}
    perf |= {k for r in rows for k in r if k.startswith(IDLE)}
    return means | {k: statistics.fmean(r[k] for r in rows if k in r) for k in sorted(perf)}


def run_ours(w: Workload, precision: str, steps: int, warmup: int, out_dir: Path) -> Result:
    import yaml

    config = out_dir.with_name(out_dir.name + ".yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(ours_config(w, steps, precision)))
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "train",
        str(config),
        f"output_dir={out_dir}",
        "logging.progress=false",
        f"train.max_steps={steps}",
    ]
    rc, output, wall = _run(cmd, out_dir.with_name(out_dir.name + ".log"))
    summary_path = out_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        return Result(error=f"rc={rc}: {tail(output)}", wall_s=wall)
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x]
    rows = sorted((r for r in rows if "timing/step" in r), key=lambda r: r["step"])
    timed = rows[warmup:]
    phases = _means(timed)
    extra = {"summary_samples_per_s": summary.get("samples_per_s") or float("nan")}
    if timed and all("response/length" in r for r in timed):
        extra["response_len"] = statistics.fmean(r["response/length"] for r in timed)
    return Result(
        samples_per_s=steady_rate([r["timing/step"] for r in rows], w.rows, warmup),
        step_s=[r["timing/step"] for r in rows],
        phases=phases,
        extra=extra,
        wall_s=wall,
    )


def run_trl(w: Workload, precision: str, steps: int, warmup: int, out_dir: Path) -> Result:
    spec = {
        "trainer": w.trl,
        "model": w.model,
        "precision": precision,
        "prompts": w.prompts,
        "samples": w.samples,
        "micro": w.micro,
        "max_new_tokens": w.max_new_tokens,
        "lr": w.lr,
        "chat": w.chat,
        "steps": steps,
        "warmup": warmup,
        "output_dir": str(out_dir),
        "niceness": TRL_NICENESS,
    }
    cmd = [sys.executable, "-m", "bench.online", "--trl-worker", json.dumps(spec)]
    rc, output, wall = _run(cmd, out_dir.with_name(out_dir.name + ".log"))
    lines = [x for x in output.splitlines() if x.startswith(RESULT_TAG)]
    if rc != 0 or not lines:
        return Result(error=f"rc={rc}: {tail(output)}", wall_s=wall)
    got = json.loads(lines[-1][len(RESULT_TAG) :])
    return Result(
        samples_per_s=got["samples_per_s"], step_s=got["step_s"], extra=got["extra"], wall_s=wall
    )


# ----------------------------------------------------------------------------- idle machine


def _family() -> set[int]:
    """This process, its ancestors and its descendants (their command lines may match)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, rest = text.split(" ", 1)
        parents[int(pid)] = int(rest.rsplit(")", 1)[1].split()[1])
    family, pid = {os.getpid()}, os.getpid()
    while pid in parents and parents[pid] > 1:
        pid = parents[pid]
        family.add(pid)
    grew = True
    while grew:
        children = {p for p, pp in parents.items() if pp in family and p not in family}
        grew = bool(children)
        family |= children
    return family


def others_busy() -> list[str]:
    """Command lines of other training / benchmark / test processes running now."""
    out = subprocess.run(["pgrep", "-af", BUSY_PATTERN], capture_output=True, text=True).stdout
    mine = _family()
    return [x for x in out.splitlines() if x.strip() and int(x.split()[0]) not in mine]


class IdleWaiter:
    """Before each run: poll every `poll_s` until no other busy process is left, within a
    total budget of `max_s` seconds for the whole invocation (then runs go ahead anyway)."""

    def __init__(self, enabled: bool, max_s: float, poll_s: float = 20.0):
        self.enabled, self.left, self.poll_s = enabled, max_s, poll_s
        self.waited = 0.0

    def wait(self, label: str) -> bool | None:
        """True: idle when it started; False: busy (budget spent); None: not checked."""
        if not self.enabled:
            return None
        busy = others_busy()
        while busy and self.left > 0:
            first = busy[0][:150]
            print(
                f"{label}: waiting for {len(busy)} other process(es), e.g. {first} "
                f"({self.left / 60:.0f} min of waiting left)",
                file=sys.stderr,
                flush=True,
            )
            pause = min(self.poll_s, self.left)
            time.sleep(pause)
            self.left -= pause
            self.waited += pause
            busy = others_busy()
        if busy:
            print(f"{label}: still busy, running anyway", file=sys.stderr, flush=True)
        return not busy


# ----------------------------------------------------------------------------- the runs


def steps_for(w: Workload, args) -> int:
    return args.steps if w.model == "tiny" else args.smollm2_steps


def run_key(side: str, precision: str) -> str:
    """The results' key of one side at one precision: "ours fp32", "trl bf16"."""
    return f"{side} {precision}"


def run_all(names: list[str], args, work: Path) -> dict[str, dict[str, list[Result]]]:
    """Every workload at every precision, `args.repeats` times; within a repeat and a workload
    ours and TRL alternate across the precisions (ours fp32, TRL fp32, ours bf16, TRL bf16)."""
    waiter = IdleWaiter(args.wait_idle, args.wait_max)
    done: dict[str, dict[str, list[Result]]] = {}
    for rep in range(args.repeats):
        for name in names:
            w = BY_NAME[name]
            sides = ["ours", *(["trl"] if w.trl else [])]
            runs = [(side, p) for p in args.precision for side in sides]
            res = done.setdefault(name, {run_key(*run): [] for run in runs})
            for side, precision in runs:
                key = run_key(side, precision)
                label = f"[{name} {rep + 1}/{args.repeats}] {key}"
                idle = waiter.wait(label)
                out = work / f"{name}-{side}-{precision}-{rep}"
                print(f"{label} ...", file=sys.stderr, flush=True)
                load = os.getloadavg()[0]
                steps = steps_for(w, args)
                runner = run_ours if side == "ours" else run_trl
                r = runner(w, precision, steps, args.warmup, out)
                r.extra["load1"] = load
                if idle is not None:
                    r.extra["idle"] = float(idle)
                res[key].append(r)
                shown = f"FAILED {r.error}" if r.error else f"{_rate(r.samples_per_s)} samples/s"
                print(f"{label}: {shown} (wall {r.wall_s or 0:.0f}s)", file=sys.stderr, flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                    for suffix in (".log", ".yaml"):
                        out.with_name(out.name + suffix).unlink(missing_ok=True)
    done["_wait"] = {"waited_s": [Result(extra={"waited_s": waiter.waited})]}
    return done


# ----------------------------------------------------------------------------- the report


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return format(x, spec) if x is not None else "-"


def _rate(x: float | None) -> str:
    """samples/s: one decimal, two below 10 (SmolLM2 runs well under 1/s)."""
    return _fmt(x, ".1f" if x is None or x >= 10 else ".2f")


def _ok(results: list[Result]) -> list[Result]:
    return [r for r in results if r.error is None]


def _ratio_row(
    name: str, precision: str, res: dict[str, list[Result]], a: str, b: str, target
) -> str:
    """One comparison row: the median samples/s of runs a and b (keys of res; b absent: a
    workload without a TRL peer) and a/b against the target (None: report only)."""
    ra, rb = _ok(res.get(a, [])), _ok(res.get(b, []))
    x, y = median(r.samples_per_s for r in ra), median(r.samples_per_s for r in rb)
    ratio = x / y if x and y else None
    shown_b = "n/a" if b not in res else (_rate(y) if rb else "failed")
    shown = f"{ratio:.2f}x" if ratio is not None else ("n/a" if b not in res else "-")
    met = "-" if not target or ratio is None else ("yes" if ratio >= target else "NO")
    return (
        f"| {name} | {precision} | {f'{a} / {b}' if b in res else f'{a} (no TRL peer)'} "
        f"| {_rate(x) if ra else 'failed'} | {shown_b} | {shown} "
        f"| {f'>= {target:.1f}x' if target else 'report'} | {met} |"
    )


def table(done: dict[str, dict[str, list[Result]]], precisions: list[str]) -> list[str]:
    """The comparisons: per workload and precision ours / TRL (the target: ours >= TRL at
    equal precision), and, when both precisions ran, ours bf16 / ours fp32 (and TRL's own
    bf16 / fp32, reported)."""
    lines = [
        "| workload | precision | a / b | a samples/s | b samples/s | a/b | target | met |",
        "|" + "---|" * 8,
    ]
    both = all(p in precisions for p in PRECISIONS)
    for w in WORKLOADS:
        res = done.get(w.name)
        if res is None:
            continue
        for p in precisions:
            ours, trl = run_key("ours", p), run_key("trl", p)
            if w.sync_of:  # an async variant: against TRL's and our synchronous runs
                sync = done.get(w.sync_of, {})
                peers = {
                    ours: res.get(ours, []),
                    trl: sync.get(trl, []),
                    f"ours sync {p}": sync.get(ours, []),
                }
                lines.append(_ratio_row(w.name, p, peers, ours, trl, w.target))
                lines.append(_ratio_row(w.name, p, peers, ours, f"ours sync {p}", w.sync_target))
                continue
            lines.append(_ratio_row(w.name, p, res, ours, trl, w.target))
        if both:
            a, b = run_key("ours", "bf16"), run_key("ours", "fp32")
            lines.append(_ratio_row(w.name, "bf16 / fp32", res, a, b, w.bf16_target))
            if w.trl:
                a, b = run_key("trl", "bf16"), run_key("trl", "fp32")
                lines.append(_ratio_row(w.name, "bf16 / fp32", res, a, b, None))
    return lines


def phase_table(done: dict[str, dict[str, list[Result]]], precisions: list[str]) -> list[str]:
    """Ours per workload and precision: samples/s, the per-phase means, tokens/s, the model
    FLOP utilisation of the policy and rollout roles ('-' where metrics.jsonl has none), and
    summary.json's samples/s."""
    mfu_heads = " | ".join(f"{role} MFU" for role in MFU_ROLES)
    lines = [
        "| workload | precision | ours samples/s | rollout s | make_experience s | train s "
        f"| sync s | step s | tokens/s | {mfu_heads} | summary.json samples/s |",
        "|" + "---|" * (10 + len(MFU_ROLES)),
    ]
    for w in WORKLOADS:
        for p in precisions:
            results = done.get(w.name, {}).get(run_key("ours", p))
            if results is None:
                continue
            ours = _ok(results)
            rate = median(r.samples_per_s for r in ours)
            phases = [_fmt(median(r.phases.get(k) for r in ours), ".3f") for k in PHASES[:-1]]
            tokens = _fmt(median(r.phases.get(PHASES[-1]) for r in ours), ".0f")
            mfu = [
                _fmt(median(r.phases.get(f"perf/{role}/mfu") for r in ours), ".3g")
                for role in MFU_ROLES
            ]
            summary = _rate(median(r.extra.get("summary_samples_per_s") for r in ours))
            lines.append(
                f"| {w.name} | {p} | {_rate(rate) if ours else 'failed'} | {' | '.join(phases)} "
                f"| {tokens} | {' | '.join(mfu)} | {summary} |"
            )
    return lines


def idle_table(done: dict[str, dict[str, list[Result]]], precisions: list[str]) -> list[str]:
    """Ours per workload and precision: the step, and each role's idle seconds in it (means
    of timing/idle/<role> over the timed steps, medians over repeats; '-' where the run has
    no such role or logs none): where a pipeline stalls, its busy role idles least."""
    lines = [
        "| workload | precision | step s | "
        + " | ".join(f"{role} idle s" for role in IDLE_ROLES)
        + " |",
        "|" + "---|" * (3 + len(IDLE_ROLES)),
    ]
    for w in WORKLOADS:
        for p in precisions:
            ours = _ok(done.get(w.name, {}).get(run_key("ours", p), []))
            if not any(k.startswith(IDLE) for r in ours for k in r.phases):
                continue
            step = _fmt(median(r.phases.get("timing/step") for r in ours), ".2f")
            idle = [
                _fmt(median(r.phases.get(IDLE + role) for r in ours), ".2f") for role in IDLE_ROLES
            ]
            lines.append(f"| {w.name} | {p} | {step} | {' | '.join(idle)} |")
    return lines


def _note(key: str, x: float | None) -> str:
    """key=value for the run list: two decimals, three significant digits below 1."""
    x = x or 0.0
    return f"{key}={x:.2f}" if abs(x) >= 1 or x == 0 else f"{key}={x:.3g}"


def details(done: dict[str, dict[str, list[Result]]], warmup: int) -> list[str]:
    lines = [
        "| workload | run | samples/s per repeat | median step s | wall s | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in done.items():
        if name.startswith("_"):
            continue
        for key, results in res.items():
            rates = ", ".join("failed" if r.error else _rate(r.samples_per_s) for r in results)
            step = median(s for r in _ok(results) for s in r.step_s[warmup:])
            walls = ", ".join(f"{r.wall_s:.0f}" for r in results if r.wall_s)
            keys = sorted({k for r in results for k in r.extra})
            notes = [_note(k, median(r.extra.get(k) for r in _ok(results))) for k in keys]
            # perf/<role>/{mfu,tflops,busy}, where metrics.jsonl has them (ours).
            perf = sorted({k for r in results for k in r.phases if k.endswith(PERF_SUFFIXES)})
            notes += [
                _note(k.removeprefix("perf/"), median(r.phases.get(k) for r in _ok(results)))
                for k in perf
            ]
            errors = [r.error.splitlines()[-1][:160] for r in results if r.error]
            lines.append(
                f"| {name} | {key} | {rates} | {_fmt(step, '.3f')} | {walls} "
                f"| {'; '.join(notes + errors).replace('|', '/')} |"
            )
    return lines


TRL_SETTINGS = """\
TRL settings (`GRPOConfig` / `RLOOConfig`): `per_device_train_batch_size` = ours
`train.micro_batch_size` (tiny: 32, the whole generation batch of 8 prompts x
`num_generations=4`; smollm2-grpo: 8 of the 16 responses of 4 prompts x 4),
`gradient_accumulation_steps` = responses / micro-batch (tiny 1, smollm2-grpo 2, as ours),
`steps_per_generation` = gradient accumulation (its default: one generation batch per optimizer
step, generated in one call and split into the micro-batches), `num_iterations=1`, so one
generation batch gives one optimizer step, as ours with `ppo.ppo_epochs=1`,
`ppo.num_mini_batches=1`; `max_completion_length` = ours `max_new_tokens` (tiny 16, SmolLM2
32), `temperature=1.0`, `top_k=0`, `top_p=1.0`, `beta=0.05` (GRPO's default is 0.0, which
would skip the reference model; RLOO's default is 0.05; ours `ppo.kl_coef=0.05`, reference
log-probs on both sides). The KL goes where each TRL trainer puts it: GRPO adds β·k3 per token
to the loss (ours `ppo.kl_penalty=loss`, `ppo.kl_estimator=k3`), RLOO subtracts β·k1 from the
reward (ours `ppo.kl_penalty=reward`, `ppo.kl_estimator=k1`; TRL sums it over the sequence
before the leave-one-out baseline, ours shapes the per-token rewards: the same work).
`epsilon=0.2` (ours `ppo.clip_eps=0.2`), `learning_rate=1e-5`, `lr_scheduler_type=constant`,
`warmup_steps=0`, `optim=adamw_torch_fused`, `weight_decay=0`, `max_grad_norm=1.0`,
`gradient_checkpointing=False` (TRL's default is on), `use_cpu=True`,
`dataloader_num_workers=0`, `report_to=none`, `save_strategy=no`, `eval_strategy=no`,
`logging_strategy=no`, `seed=42`, `torch.set_num_threads(1)`, `HF_HUB_OFFLINE=1`, and the
TRL process at niceness {niceness} (Ray starts our actors at 15; `--trl-niceness`). The
model is the folder of `rlhf.assets.build_tiny()` or `rlhf.assets.prepare_smollm2()`, loaded
in fp32 (`model_init_kwargs`, TRL's default dtype); the dataset is the `prompt` column of
`rlhf.data.synthetic.reviews("train")`: plain text for the tiny model (ours
`data.chat_prompts=false`), for SmolLM2 one user message per prompt, which TRL renders
through the tokenizer's chat template with the generation prompt, as ours does with
`data.chat_prompts=true`; the reward function wraps `rlhf.rewards.vader_sentiment` (the last
message's content when chat). Ours: the same model, reward, prompts, prompts per step
(`train.global_batch_size`), `roles.rollout.n_samples_per_prompt`, `max_new_tokens`,
`train.micro_batch_size` (tiny 32: one forward / backward per step, as TRL's; SmolLM2 8),
torch AdamW, constant lr, ZeRO-0, HF rollout (`roles.rollout.backend=hf`).

Precision (`--precision`, one row per precision; ours and TRL always at the same one): fp32:
ours `train.precision=fp32`, TRL `bf16=False`. bf16: ours `train.precision=bf16` (on CPU
the trainers compute under `torch.autocast("cpu", torch.bfloat16)` over fp32 master weights
and AdamW state; the reference and the HF rollout engine hold bf16 weights), TRL `bf16=True`
(its default on bf16 hardware: accelerate's bf16 autocast around the fp32-loaded model's
forward, the policy's and the reference's; its weights stay fp32). `ours bf16 / ours fp32`
compares our two precisions on the same workload (target 1.8x on the SmolLM2 workloads);
`trl bf16 / trl fp32` shows what bf16 gives TRL (reported).

Differences that remain, by design: ours runs rollout, policy and reference (and critic) as
separate Ray actors, one thread each, scores the reward function in the driver
(`roles.reward.run_in=auto`), and syncs weights to the rollout actor after every step; TRL
does everything in one process and one thread. So on the 2 cores, for RLOO the reference and
old log-probs run concurrently with each other and with the reward; for GRPO the reference
forward runs during the update's own forward. The HF rollout draws tokens by inverse CDF
(`actors.rollout.draw_tokens`), TRL's `generate` by torch.multinomial: the same distribution.
Both sides skip the old-log-prob forward where it equals the update's own (GRPO: one update
per batch, KL in the loss); RLOO needs it on both sides for the KL in the reward; the
`tiny-rloo-engine-logps` row takes it from the HF engine's own log-probs instead
(`ppo.old_logps=rollout`, equal to the trainer's within 1e-5 in fp32; in bf16 the engine's
numerics are not the trainer's), which TRL does not offer, so it is reported without a
target. The `-hybrid` rows run the rollout inside the policy's actor on the trainer's own
weights (`roles.rollout.hybrid=true`): no rollout actor and no weight sync, as TRL generates
with the model it trains; the reference still runs in its own actor."""


def report(done, args, load: tuple, elapsed: float) -> str:
    waited = done.get("_wait", {}).get("waited_s", [Result()])[0].extra.get("waited_s", 0.0)
    shapes = ", ".join(
        f"{w.name} {w.prompts}x{w.samples} / {w.max_new_tokens} new tokens"
        for w in WORKLOADS
        if w.name in done
    )
    lines = [
        "# Online RL throughput: rlhf vs TRL",
        "",
        f"`{' '.join(['python -m bench.online', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {elapsed / 60:.0f} min; {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} before and {load[1]:.2f} after"
        + (f"; waited {waited / 60:.1f} min for an idle machine." if args.wait_idle else "."),
        "",
        f"{versions(VERSIONED)}.",
        "",
        f"Steps per run: tiny {args.steps}, SmolLM2 {args.smollm2_steps}; the first "
        f"{args.warmup} are warm-up and left out. Medians of {args.repeats} interleaved "
        f"repeat(s); within a repeat the runs alternate ours, TRL across the precisions "
        f"({', '.join(args.precision)}). Workloads (prompts x samples per step): {shapes}. "
        "samples/s = responses per second over whole steps. Ours: from metrics.jsonl "
        "`timing/step` (rollout to weight sync). TRL: between consecutive `on_step_end` "
        "callbacks. Targets: ours >= TRL at equal precision (1.0x; `report` where the "
        "workload has none), ours bf16 >= 1.8x ours fp32 on the SmolLM2 workloads.",
        "",
        *table(done, args.precision),
        "",
        "Ours, phase by phase: means of `timing/*` and `perf/tokens_per_s` over the timed "
        "steps; MFU = metrics.jsonl `perf/<role>/mfu` where the run logs it ('-' where not); "
        "`summary.json samples/s` is the run's own figure (2 warm-up steps).",
        "",
        *phase_table(done, args.precision),
        "",
        "Ours, idle time per role: means of `timing/idle/<role>` over the timed steps, the "
        "seconds of a step in which the role's actors ran no call (a rank waiting in the "
        "weight sync counts as idle; mean over ranks); the role that idles least sets the pace.",
        "",
        *idle_table(done, args.precision),
        "",
        TRL_SETTINGS.format(niceness=TRL_NICENESS),
        "",
        "## Every run",
        "",
        "`response_len`: mean generated tokens per response (equal work needs equal lengths); "
        "`compute_s` (TRL): median `on_step_begin` -> `on_step_end`; `load1`: 1-minute load "
        "average as the run started; `idle`: 1 when no other training, benchmark or test "
        "was running as it started; `<role>/mfu`, `<role>/tflops`, `<role>/busy`: means of "
        "metrics.jsonl `perf/<role>/...` over the timed steps, where the run logs them.",
        "",
        *details(done, args.warmup),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- TRL worker


def trl_worker(spec: dict) -> None:
    """One TRL GRPO / RLOO run in this process; prints one RESULT_TAG line of JSON."""
    import resource

    import torch

    os.nice(spec["niceness"])  # from 0: the same priority as our Ray actors (Ray's default 15)
    torch.set_num_threads(1)
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    from rlhf.assets import build_tiny, prepare_smollm2
    from rlhf.data.synthetic import reviews
    from rlhf.rewards import vader_sentiment

    folder = str(build_tiny() if spec["model"] == "tiny" else prepare_smollm2())
    if spec["chat"]:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in reviews("train")]
    else:
        rows = [{"prompt": r["prompt"]} for r in reviews("train")]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def vader(prompts, completions, **kwargs) -> list[float]:
        """TRL reward function: completions are strings, or message lists when chat."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in vader_sentiment(list(prompts), texts)]

    rows_per_step = spec["prompts"] * spec["samples"]
    micro = min(spec["micro"], rows_per_step)
    common = {
        **trl_training_args(
            spec["output_dir"], micro, spec["steps"], spec["lr"], spec["precision"]
        ),
        # Ours' micro-batches: one generation batch of rows_per_step responses, split into
        # micro-batches of `micro`, one optimizer step (steps_per_generation = accumulation).
        "gradient_accumulation_steps": rows_per_step // micro,
        "num_generations": spec["samples"],
        "num_iterations": 1,
        "max_completion_length": spec["max_new_tokens"],
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "beta": KL_COEF,
        "epsilon": 0.2,
        # TRL's default dtype; with bf16=True accelerate autocasts around the fp32 model.
        "model_init_kwargs": {"dtype": torch.float32},
    }
    timer = step_timer()
    setup = time.perf_counter()
    if spec["trainer"] == "grpo":
        config_cls, trainer_cls = trl.GRPOConfig, trl.GRPOTrainer
    elif spec["trainer"] == "rloo":
        config_cls, trainer_cls = trl.RLOOConfig, trl.RLOOTrainer
    else:
        raise ValueError(f"unknown TRL trainer {spec['trainer']}")
    trainer = trainer_cls(
        model=folder,
        reward_funcs=vader,
        args=config_cls(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    extra = {"setup_s": time.perf_counter() - setup}
    trainer.train()
    # A step: from the previous step's end to this one's end (data and callbacks included).
    step_s = [b - a for a, b in itertools.pairwise([timer.start, *timer.end])]
    compute = [e - b for b, e in zip(timer.begin, timer.end, strict=True)][spec["warmup"] :]
    if compute:
        extra["compute_s"] = statistics.median(compute)
    # TRL logs its metrics once, at the end (logging_strategy=no): means over every step.
    logged = [x for x in trainer.state.log_history if "completions/mean_length" in x]
    if logged:
        extra["response_len"] = float(logged[-1]["completions/mean_length"])
    extra["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "samples_per_s": steady_rate(step_s, rows_per_step, spec["warmup"]),
        "step_s": step_s,
        "extra": extra,
        "trl": trl.__version__,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global TRL_NICENESS
    parser = argparse.ArgumentParser(
        prog="python -m bench.online", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument(
        "--only", action="append", choices=list(BY_NAME), help="run only this workload (repeatable)"
    )
    parser.add_argument("--steps", type=int, default=12, help="steps per tiny-model run")
    parser.add_argument("--smollm2-steps", type=int, default=5, help="steps per SmolLM2 run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the means")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians shown")
    add_precision_argument(
        parser,
        "one or more of fp32, bf16 (default: both); each workload runs at each, ours with "
        "train.precision=<p>, TRL with bf16=True for bf16; with both, the table adds ours "
        "bf16 / ours fp32 (target 1.8x on SmolLM2)",
    )
    parser.add_argument(
        "--wait-idle",
        action="store_true",
        help=f"before each run, wait until no other process matches {BUSY_PATTERN!r}",
    )
    parser.add_argument(
        "--wait-max",
        type=float,
        default=1800,
        help="seconds of waiting in all for --wait-idle; then runs go ahead (default 1800)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "online.md",
        help="markdown report (default: bench/results/online.md)",
    )
    parser.add_argument(
        "--trl-niceness",
        type=int,
        default=TRL_NICENESS,
        help="niceness of the TRL process (default 15: that of Ray's worker processes, ours)",
    )
    parser.add_argument("--keep", type=Path, help="keep every run's output folder under this one")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return 0
    TRL_NICENESS = args.trl_niceness
    args.precision = [p for p in PRECISIONS if p in args.precision]  # fp32 first, once each
    names = args.only or list(BY_NAME)
    if args.warmup >= min(steps_for(BY_NAME[n], args) for n in names):
        parser.error("--warmup must be below the number of steps")
    os.environ["RLHF_CACHE_DIR"] = str(CACHE / "rlhf")
    from rlhf.assets import build_tiny, prepare_smollm2

    build_tiny()
    if any(BY_NAME[n].model == "smollm2" for n in names):
        prepare_smollm2()
    load0, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        done = run_all(names, args, work)
    text = report(done, args, (load0, os.getloadavg()[0]), time.perf_counter() - started)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
