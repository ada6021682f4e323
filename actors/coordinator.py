"""The coordinator: `train(cfg)` picks the loop (actors.offline for SFT, reward models, the
DPO family, KTO and ORPO; actors.online for PPO and the critic-free estimators), runs it, and
when an actor dies restarts it from the last checkpoint (train.max_restarts). It runs in the
driver process (`rlhf train`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from actors.groups import ActorDied
from actors.metrics import mean_mfu
from actors.offline import OfflineRun
from actors.online import OnlineRun
from rlhf.config import RunConfig
from rlhf.models import check_run_models
from rlhf.objectives import model_kind
from rlhf.rundir import Claim, TrainingAborted, claim_output_dir, complete_checkpoints


def _make_run(cfg: RunConfig, claim: Claim):
    if cfg.algorithm == "ppo":
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
