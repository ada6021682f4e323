"""What the offline and the online loop share: the environment and the Ray cluster they run
on, the data order of a step (StepPlan), checkpoint writing, the actors' pid file, and the
fault-injection hook. Both loops (actors.offline, actors.online) build on it; the coordinator
(actors.coordinator) picks one and restarts it after a dead actor."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from actors.groups import ActorDied, ActorGroup
from rlhf.config import RunConfig
from rlhf.data.quarantine import DataError
from rlhf.placement import active_roles, role_resources
from rlhf.rundir import (
    COMPLETE,
    Claim,
    TrainingAborted,
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
