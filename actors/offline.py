"""The offline loop (SFT, reward models, the DPO family, KTO, ORPO): data order, reference
log-probs (on the fly, one step ahead, or precomputed and cached), train steps, eval, metrics,
checkpoints and resume.

It runs in the driver process (`rlhf train`, through actors.coordinator) and talks to actors
only through their typed groups (actors.groups).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from actors.groups import PolicyGroup, ReferenceGroup, start_placement
from actors.metrics import MetricsLogger, RolePerf, reduce_metrics
from actors.policy import StepResult
from actors.refcache import ReferenceCache
from actors.run import (
    FAULT_EXIT_AFTER_STEP,
    StepPlan,
    init_ray,
    write_actor_pids,
    write_checkpoint,
)
from rlhf.config import RunConfig, dump_config
from rlhf.data import load_datasets, make_collator
from rlhf.data.pipeline import TokenizedDataset
from rlhf.flops import offline_step_flops
from rlhf.models import load_tokenizer
from rlhf.rundir import Claim, TrainingAborted

log = logging.getLogger(__name__)


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
                idle = self.placement.clock.idle(tick, now)  # timing/idle/<role>
                tick = now
                samples += plan.global_batch
                for r in results:
                    r.metrics["timing/step"] = self.step_times[-1]
                last = self._after_step(step + 1, results, logger, samples, idle)
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
        queued = self.policy.submit_train_step(work)  # type: ignore[union-attr]
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
        self,
        step: int,
        results: list[StepResult],
        logger: MetricsLogger,
        samples: int,
        idle: dict[str, float],
    ) -> dict[str, float]:
        cfg = self.cfg
        metrics = reduce_metrics([r.metrics for r in results]) | idle
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
