"""The coordinator: drives the role groups through the offline loop (SFT, reward models, the
DPO family, KTO, ORPO) — data order, reference log-probs (on the fly, one step ahead, or
precomputed and cached), train steps, eval, metrics, checkpoints and resume.

It runs in the driver process (`rlhf train`) and talks to actors only through the typed
groups below.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from actors.group import ActorDied, ActorGroup, ClusterPlacement, start_placement
from actors.metrics import MetricsLogger, RolePerf, mean_mfu
from actors.policy import PolicyTrainer, StepResult
from actors.refcache import ReferenceCache
from actors.reference import ReferenceModel
from rlhf.config import RunConfig, dump_config
from rlhf.data import load_datasets, make_collator
from rlhf.data.pipeline import TokenizedDataset
from rlhf.data.quarantine import DataError
from rlhf.flops import offline_step_flops
from rlhf.models import check_run_models, load_tokenizer
from rlhf.objectives import RefLogps, model_kind
from rlhf.placement import active_roles, role_resources
from rlhf.rundir import (
    COMPLETE,
    Claim,
    TrainingAborted,
    claim_output_dir,
    complete_checkpoints,
    disk_full_message,
    is_disk_full,
    seal_checkpoint,
)

log = logging.getLogger(__name__)

#: Test hook: the coordinator exits abruptly (like a crash) right after this step.
FAULT_EXIT_AFTER_STEP = "RLHF_FAULT_EXIT_AFTER_STEP"
#: Set by Ray in the driver of a Ray job (ray._private.runtime_env.constants).
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: Environment passed to every actor (caches and offline switches must reach them).
FORWARDED_ENV = (
    "RLHF_CACHE_DIR",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TRANSFORMERS_OFFLINE",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "RLHF_FAULT_NAN_STEPS",
    "RLHF_THREADS_PER_ACTOR",
    "WANDB_MODE",
    "WANDB_DIR",
    "HF_HUB_DISABLE_PROGRESS_BARS",
)


# ----------------------------------------------------------------------------- groups


class PolicyGroup(ActorGroup[PolicyTrainer]):
    def __init__(self, cfg: RunConfig, total_steps: int, placement: ClusterPlacement | None = None):
        res = cfg.roles.policy.resources
        super().__init__("policy", PolicyTrainer, res, cfg, total_steps, placement=placement)

    def train_step(self, per_rank: list[tuple[list, list]]) -> list[StepResult]:
        return self.gather(self.call_each(lambda a, x: a.train_step.remote(*x), per_rank))

    def eval_step(self, per_rank: list[tuple[list, list]]) -> list[dict[str, float]]:
        return self.gather(self.call_each(lambda a, x: a.eval_step.remote(*x), per_rank))

    def save_checkpoint(self, path: str, tag: str) -> None:
        self.gather(self.call(lambda a: a.save_checkpoint.remote(path, tag)))

    def load_checkpoint(self, path: str, tag: str) -> int:
        return self.gather(self.call(lambda a: a.load_checkpoint.remote(path, tag)))[0]

    def export(self, out_dir: str, merge: bool) -> str:
        return self.gather(self.call(lambda a: a.export.remote(out_dir, merge)))[0]

    def parameter_digest(self) -> list[float]:
        return self.gather(self.call(lambda a: a.parameter_digest.remote()))[0]

    def peak_rss_mb(self) -> list[float]:
        return self.gather(self.call(lambda a: a.peak_rss_mb.remote()))


class ReferenceGroup(ActorGroup[ReferenceModel]):
    def __init__(self, cfg: RunConfig, placement: ClusterPlacement | None = None):
        res = cfg.roles.reference.resources
        super().__init__("reference", ReferenceModel, res, cfg, placement=placement)

    def logps(self, batches: list) -> list[ray.ObjectRef]:
        """Submit batches round-robin over the ranks; one ref per rank that got any."""
        shards = [batches[r :: self.world_size] for r in range(self.world_size)]
        return [a.logps.remote(s) for a, s in zip(self.actors, shards, strict=True) if s]

    def peak_rss_mb(self) -> list[float]:
        return self.gather(self.call(lambda a: a.peak_rss_mb.remote()))

    def collect(self, refs: list[ray.ObjectRef], n: int) -> list[RefLogps]:
        """Undo the round-robin of `logps` for n batches."""
        shards = self.gather(refs)
        out: list[RefLogps | None] = [None] * n
        for r, shard in enumerate(shards):
            out[r :: self.world_size] = shard
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- data order


@dataclass(frozen=True)
class StepPlan:
    """Which examples each optimizer step uses: a seeded permutation per epoch, cut into
    global batches (a last partial batch is dropped), each cut into per-rank micro-batches."""

    n_examples: int
    global_batch: int
    micro_batch: int
    world_size: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch

    @property
    def total_steps(self) -> int:
        """max_steps when set (it wins over epochs, as in HF Trainer), else epochs' worth."""
        return self.max_steps if self.max_steps else self.steps_per_epoch * self.epochs

    def announce(self, rows: str) -> None:
        """Refuse data that makes no full step (`rows`: what the examples are called), and say
        when max_steps takes more passes over the data than epochs say."""
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.n_examples} {rows} make no full global batch of {self.global_batch} "
                "(train.global_batch_size): lower it or add data"
            )
        if self.max_steps and self.max_steps > self.steps_per_epoch * self.epochs:
            print(
                f"train.max_steps={self.max_steps} wins over train.epochs={self.epochs}: "
                f"{self.max_steps / self.steps_per_epoch:.2f} passes over the data "
                f"({self.steps_per_epoch} steps each)",
                flush=True,
            )

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_examples, generator=g).tolist()

    def step_indices(self, step: int) -> list[int]:
        """Dataset indices of 0-based optimizer step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def per_rank(self, indices: list[int]) -> list[list[list[int]]]:
        """indices -> [rank][micro-batch] -> indices."""
        per = len(indices) // self.world_size
        ranks = [indices[r * per : (r + 1) * per] for r in range(self.world_size)]
        return [
            [rank[i : i + self.micro_batch] for i in range(0, len(rank), self.micro_batch)]
            for rank in ranks
        ]


# ----------------------------------------------------------------------------- the run


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if not cfg.logging.verbose:
        # One "Loading weights" bar per actor per model is noise; logging.verbose shows them.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if os.environ.get("RAY_ADDRESS"):
        # Inside a Ray job (`rlhf submit`, `ray job submit`) the job's runtime_env already
        # reaches every actor; passing env_vars again would clash with it.
        in_job = RAY_JOB_CONFIG in os.environ
        runtime_env = None if in_job else {"env_vars": env}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
        return
    needed = sum(
        role_resources(cfg, r).world_size * role_resources(cfg, r).cpus_per_rank
        for r in active_roles(cfg)
    )
    _loopback_only()
    # Token auth stays on (Ray's default for a new local cluster), without Ray's line at
    # every run that suggests RAY_AUTH_MODE=disabled to opt out.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    ray.init(
        # A cluster of its own, also when `ray start` left one running on this machine (which
        # a bare ray.init() would join).
        address="local",
        num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        configure_logging=False,
    )


def _loopback_only() -> None:
    """A local cluster listens on 127.0.0.1 alone. Ray turns a node IP of 127.0.0.1 into the
    host's LAN address, and its services (GCS, raylet, workers, agents, metrics) bind to that
    or to every interface, unless it is told the node is no cluster: Ray's own switch for
    laptops, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read at import, so the constant is set too;
    the env var reaches the processes Ray starts)."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


class OfflineRun:
    def __init__(self, cfg: RunConfig, claim: Claim):
        self.cfg, self.claim = cfg, claim
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        fmt = cfg.data_format
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_set, self.eval_set = load_datasets(cfg.data, fmt, self.tokenizer, self.out)
        for ds in (self.train_set, self.eval_set):
            if ds is not None:
                print(f"data: {ds.summary()}", flush=True)
        pack = cfg.data.max_length if cfg.data.packing else None
        self.collate = make_collator(fmt, self.tokenizer.pad_token_id, pack)
        t, res = cfg.train, cfg.roles.policy.resources
        self.plan = StepPlan(
            len(self.train_set),
            t.global_batch_size,
            t.micro_batch_size,
            res.world_size,
            t.epochs,
            t.max_steps,
            cfg.data.seed,
        )
        self.plan.announce("training examples")
        self.policy: PolicyGroup | None = None
        self.reference: ReferenceGroup | None = None
        self.ref_cache: ReferenceCache | None = None

    # ------------------------------------------------------------------ helpers

    def _batches(self, dataset: TokenizedDataset, groups: list[list[int]]) -> list:
        return [self.collate([dataset[i] for i in g]) for g in groups]

    def _make_step(self, step: int) -> list[tuple[list, list[int]]]:
        """Per rank: (micro-batches, the index groups they hold)."""
        groups = self.plan.per_rank(self.plan.step_indices(step))
        return [(self._batches(self.train_set, g), [i for mb in g for i in mb]) for g in groups]

    def _submit_refs(self, per_rank: list[tuple[list, list[int]]]):
        """Start the reference log-probs of a step (on-the-fly mode); None when not needed
        (no reference, or precomputed log-probs served from the cache)."""
        if self.reference is None or self.ref_cache is not None:
            return None
        flat = [b for batches, _ in per_rank for b in batches]
        return self.reference.logps(flat), len(flat)

    def _refs_for(self, per_rank, pending) -> list[list]:
        if self.ref_cache is not None:
            return [[self.ref_cache.lookup(b) for b in batches] for batches, _ in per_rank]
        if pending is None:
            return [[None] * len(batches) for batches, _ in per_rank]
        flat = self.reference.collect(*pending)  # type: ignore[union-attr]
        out, i = [], 0
        for batches, _ in per_rank:
            out.append(flat[i : i + len(batches)])
            i += len(batches)
        return out

    # ------------------------------------------------------------------ phases

    def start(self) -> int:
        """Start the groups and return the step to continue from (0, or a checkpoint's)."""
        init_ray(self.cfg)
        dump_config(self.cfg, self.out / "config.yaml")
        # The placement plan on the live nodes: printed, refused before any actor if it cannot fit.
        self.placement = start_placement(self.cfg)
        self.policy = PolicyGroup(self.cfg, self.plan.total_steps, self.placement)
        if self.cfg.needs_reference:
            self.reference = ReferenceGroup(self.cfg, self.placement)
            if self.cfg.algorithm == "dpo" and self.cfg.dpo.precompute_ref_logps:
                self.ref_cache = ReferenceCache(
                    self.cfg, self.train_set, self.reference, self.collate, self.plan.order(0)
                )
        write_actor_pids(self.out, {"policy": self.policy, "reference": self.reference})
        # A reference serving a precomputed cache does no per-step work.
        on_the_fly = self.reference if self.ref_cache is None else None
        self.perf = RolePerf({"policy": self.policy, "reference": on_the_fly})
        self.step_flops: dict[int, dict[str, float]] = {}
        return self._resume()

    def _resume(self) -> int:
        path = self.claim.resume_from
        if path is None:
            return 0
        step = self.policy.load_checkpoint(str(path.parent), path.name)  # type: ignore[union-attr]
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["step"] == step, f"checkpoint {path} is inconsistent"
        self.bad_steps = state.get("bad_steps", 0)
        print(f"resumed from {path} at step {step}", flush=True)
        return step

    def save(self, step: int) -> Path:
        tag = f"step_{step}"
        self.last_checkpoint = write_checkpoint(
            self.cfg,
            self.claim,
            self.ckpt_root / tag,
            lambda: self.policy.save_checkpoint(str(self.ckpt_root), tag),  # type: ignore[union-attr]
            {"step": step, "bad_steps": self.bad_steps},
        )
        return self.last_checkpoint

    def evaluate(self) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        world = self.plan.world_size
        groups = [
            list(range(i, min(i + self.plan.micro_batch, len(self.eval_set))))
            for i in range(0, len(self.eval_set), self.plan.micro_batch)
        ]
        batches = self._batches(self.eval_set, groups)
        refs: list = [None] * len(batches)
        if self.reference is not None:
            refs = self.reference.collect(self.reference.logps(batches), len(batches))
        shards = [(batches[r::world], refs[r::world]) for r in range(world)]
        totals: dict[str, float] = {}
        for sums in self.policy.eval_step(shards):  # type: ignore[union-attr]
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        n = totals.pop("n", 0.0) or 1.0
        return {f"eval/{k}": v / n for k, v in totals.items()}

    def run(self) -> dict[str, float]:
        self.bad_steps = 0
        self.last_checkpoint = None
        start = self.start()
        cfg, plan = self.cfg, self.plan
        logger = MetricsLogger(cfg, plan.total_steps, start)
        samples, last = 0, {}
        self.step_times: list[float] = []
        self.first_step_done: float | None = None  # perf_counter at the end of the first step
        try:
            self._upcoming = None
            if start < plan.total_steps:
                self._prepare(start)
            queued = self._launch(start) if start < plan.total_steps else None
            tick = time.perf_counter()
            for step in range(start, plan.total_steps):
                current, queued = queued, None
                # Queue the next step behind this one (the actor runs it as soon as this one
                # ends, no driver round trip in between), unless something must happen between
                # them: eval, checkpoint, or the end of the run.
                if step + 1 < plan.total_steps and not self._needs_barrier(step + 1):
                    queued = self._launch(step + 1)
                results = self.policy.gather(current)  # type: ignore[union-attr]
                now = time.perf_counter()
                self.first_step_done = self.first_step_done or now
                self.step_times.append(now - tick)
                tick = now
                samples += plan.global_batch
                for r in results:
                    r.metrics["timing/step"] = self.step_times[-1]
                last = self._after_step(step + 1, results, logger, samples)
                if queued is None and step + 1 < plan.total_steps:
                    queued = self._launch(step + 1)
                    tick = time.perf_counter()  # eval and checkpoint time is not step time
        finally:
            logger.close()
        return last

    def _prepare(self, step: int) -> None:
        """Collate a step's batches and start its reference log-probs (on the fly)."""
        batches = self._make_step(step)
        self._upcoming = (step, batches, self._submit_refs(batches))

    def _launch(self, step: int) -> list:
        """Submit train_step of 0-based `step` (prepared earlier), then prepare the step after
        it, so its batches and reference log-probs are ready while this one trains."""
        prepared, batches, pending = self._upcoming  # type: ignore[misc]
        assert prepared == step, f"step {step} launched, but step {prepared} was prepared"
        refs = self._refs_for(batches, pending)
        lengths = [n for rank, _ in batches for b in rank for n in b.attention_mask.sum(1).tolist()]
        self.step_flops[step + 1] = offline_step_flops(self.perf.shapes, lengths)
        work = [(b, r) for (b, _), r in zip(batches, refs, strict=True)]
        queued = self.policy.call_each(lambda a, x: a.train_step.remote(*x), work)  # type: ignore[union-attr]
        self._upcoming = None
        if step + 1 < self.plan.total_steps:
            self._prepare(step + 1)
        return queued

    def _needs_barrier(self, step: int) -> bool:
        """True when the driver must act after (1-based) `step` before the next one trains."""
        cfg = self.cfg
        every = cfg.checkpoint.every_steps
        return bool(
            (cfg.train.eval_every and step % cfg.train.eval_every == 0)
            or (every and step % every == 0)
            or os.environ.get(FAULT_EXIT_AFTER_STEP) == str(step)
        )

    def _after_step(
        self, step: int, results: list[StepResult], logger: MetricsLogger, samples: int
    ) -> dict[str, float]:
        cfg = self.cfg
        metrics = _mean([r.metrics for r in results])
        flops = self.step_flops.pop(step, {})
        metrics.update(self.perf.metrics(flops, metrics.get("timing/step", 0.0)))
        skipped = results[0].skipped
        if skipped:
            self.bad_steps += 1
            bad = sorted({i for r in results for i in r.bad_indices})
            print(f"step {step}: non-finite loss, update skipped; batch indices {bad}", flush=True)
            metrics["train/skipped"] = 1.0
            if self.bad_steps > cfg.train.max_bad_steps:
                logger.log(step, metrics, samples)
                where = (
                    f"the last good checkpoint is {self.last_checkpoint}"
                    if self.last_checkpoint
                    else "no checkpoint was written"
                )
                raise TrainingAborted(
                    f"{self.bad_steps} steps had a non-finite loss (more than train.max_bad_steps={cfg.train.max_bad_steps}); "
                    f"stopped at step {step}, {where}. Offending batch indices of the last one: {bad}"
                )
        evaluating = (
            cfg.train.eval_every and step % cfg.train.eval_every == 0
        ) or step == self.plan.total_steps
        if evaluating:
            metrics.update(self.evaluate())
        if step % cfg.logging.log_every == 0 or evaluating or skipped:
            logger.log(step, {"epoch": (step - 1) // self.plan.steps_per_epoch, **metrics}, samples)
        every = cfg.checkpoint.every_steps
        if (every and step % every == 0) or step == self.plan.total_steps:
            self.save(step)
        if os.environ.get(FAULT_EXIT_AFTER_STEP) == str(step):
            print(f"fault injection: exiting after step {step}", flush=True)
            os._exit(17)
        return metrics

    def finish(self) -> Path:
        """Export the final model (merged adapters unless checkpoint.export=adapter)."""
        final = self.out / "final"
        if self.ref_cache is not None:
            self.ref_cache.wait_all()  # the rest of the dataset, for the next run's cache
        self.policy.export(str(final), merge=self.cfg.checkpoint.export == "merged")  # type: ignore[union-attr]
        return final

    def throughput(self, warmup: int = 2) -> float | None:
        """Training samples/s over the steps after `warmup` (data order, reference log-probs
        and the step itself, as the loop runs them; eval and checkpoint time excluded)."""
        times = getattr(self, "step_times", [])[warmup:]
        return round(self.plan.global_batch * len(times) / sum(times), 2) if times else None

    def memory(self) -> dict[str, list[float]]:
        """Peak RSS (MiB) of each actor process, per role."""
        out = {"policy": self.policy.peak_rss_mb()}  # type: ignore[union-attr]
        if self.reference is not None:
            out["reference"] = self.reference.peak_rss_mb()
        return out

    def shutdown(self) -> None:
        for group in (self.policy, self.reference):
            if group is not None:
                group.shutdown()
        if getattr(self, "placement", None) is not None:
            self.placement.remove()
            self.placement = None


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {
        k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)
    }


def write_checkpoint(
    cfg: RunConfig, claim: Claim, path: Path, save_actors: Callable[[], object], state: dict
) -> Path:
    """The actors write their state into `path`, then the driver seals it (rlhf.rundir). A save
    that fails leaves nothing behind (the partial folder is removed: it was never marked
    complete); a full disk stops the run with one line naming the disk, the path and the
    free space, and the last whole checkpoint."""
    try:
        save_actors()
        return seal_checkpoint(cfg, path, state, claim.run_id)
    except BaseException as err:  # Ctrl-C and a dead actor too: no partial folder stays
        full = isinstance(err, Exception) and not isinstance(err, ActorDied)
        full = full and is_disk_full(err, path)
        if not (path / COMPLETE).exists():  # sealed already (pruning was cut): keep it
            shutil.rmtree(path, ignore_errors=True)
        if not full:
            raise
        last = complete_checkpoints(path.parent)
        where = f"the last checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise TrainingAborted(f"{disk_full_message(path, 'saving checkpoint')}; {where}") from None


def write_actor_pids(out: Path, groups: dict[str, ActorGroup | None]) -> None:
    """OUTPUT_DIR/actors.json: role -> process ids (for operators, and the kill tests)."""
    pids = {role: group.pids() for role, group in groups.items() if group is not None}
    (out / "actors.json").write_text(json.dumps(pids))


def _make_run(cfg: RunConfig, claim: Claim):
    if cfg.algorithm == "ppo":
        from actors.ppo import OnlineRun

        return OnlineRun(cfg, claim)
    return OfflineRun(cfg, claim)


def _claim(cfg: RunConfig) -> Claim:
    claim = claim_output_dir(cfg)
    for note in claim.notes:
        print(note, flush=True)
    return claim


def train(cfg: RunConfig) -> dict:
    """Run a config end to end; returns a summary (also written as summary.json).

    When an actor dies, the run stops naming the role and the last checkpoint; with
    train.max_restarts > 0 it first rebuilds every group and resumes from that checkpoint.
    """
    started = time.perf_counter()
    restarts = 0
    check_run_models(cfg, model_kind(cfg))
    claim = _claim(cfg)
    while True:
        run = _make_run(cfg, claim)
        try:
            metrics = run.run()
            final = run.finish()
            peak_rss = run.memory()
            break
        except ActorDied as err:
            last = complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
            where = (
                f"the last checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            )
            if restarts < cfg.train.max_restarts:
                restarts += 1
                print(
                    f"{err}; {where}: restarting ({restarts}/{cfg.train.max_restarts}) from it",
                    flush=True,
                )
                update = {"resume": "auto", "overwrite": False}
                cfg = cfg.model_copy(
                    update={"checkpoint": cfg.checkpoint.model_copy(update=update)}
                )
                claim = _claim(cfg)
                continue
            raise TrainingAborted(
                f"{err}; {where} (train.max_restarts restarts from it by itself)"
            ) from err
        finally:
            run.shutdown()
    first = run.first_step_done
    summary = {
        "steps": run.plan.total_steps,
        "restarts": restarts,
        "final_model": str(final),
        "wall_s": round(time.perf_counter() - started, 1),
        # Start-up: cluster, actors, models, data, up to the end of the first step.
        "first_step_s": round(first - started, 1) if first is not None else None,
        "samples_per_s": run.throughput(),
        # Mean perf/<role>/mfu over the steps after the first two (rlhf.flops).
        "mfu": mean_mfu(Path(cfg.output_dir) / "metrics.jsonl"),
        "peak_rss_mb": peak_rss,
        "metrics": metrics,
    }
    (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
