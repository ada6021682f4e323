"""ActorGroup: N ranks of one role in a Ray placement group, with typed fan-out.

Subclasses (PolicyGroup, ReferenceGroup, ...) expose one method per actor method, each
calling the actors through attribute access (no method-name strings) and returning Ray
object refs; `gather` waits for them.

Runs place their groups by a PlacementPlan (rlhf.placement): `start_placement` prints the plan
for the live nodes, refuses one that cannot fit, and reserves every bundle on its planned node
(ClusterPlacement); each group's ranks then go into their planned bundles.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.base import RankInfo
from actors.net import free_port
from actors.policy import CriticTrainer, PolicyTrainer, StepResult
from actors.reference import ReferenceModel
from actors.reward import RewardModel
from actors.rollout import RolloutGenerator
from rlhf.config import ConfigError, RoleResources, RolloutConfig, RunConfig
from rlhf.objectives import RefLogps
from rlhf.placement import PlacementPlan, nodes_from_ray, plan_placement
from rlhf.roles import engine_spec, reference_spec, reward_spec, trainer_spec

#: Ray's built-in node label (Ray >= 2.49): a bundle selecting it lands on exactly that node.
NODE_ID_LABEL = "ray.io/node-id"

T = TypeVar("T")

#: actor id (hex) -> role, so that a death anywhere can be reported by role.
_ROLES: dict[str, str] = {}


class ActorDied(RuntimeError):
    """An actor process died; `role` names it."""

    def __init__(self, role: str, cause: BaseException):
        super().__init__(
            f"the {role} actor died: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
        )
        self.role = role


class ActorStartFailed(ConfigError):
    """An actor raised in its constructor: a problem of the run's set-up (a model, a file, a
    setting), reported like a config error, with the actor's own error; nothing to resume."""

    def __init__(self, role: str, cause: BaseException):
        super().__init__(f"the {role} actor failed to start: {_remote_error_line(str(cause))}")
        self.role = role


def _remote_error_line(text: str) -> str:
    """The 'SomeError: message' line that ends a remote traceback (else the text's last line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if (
            ":" in line
            and head.replace(".", "").isidentifier()
            and head.endswith(("Error", "Exception"))
        ):
            return line
    return lines[-1] if lines else "unknown error"


def gather(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """ray.get that reports a dead actor by its role (ActorDied, or ActorStartFailed when its
    constructor raised) instead of a raw Ray error."""
    try:
        return ray.get(list(refs))
    except ray.exceptions.RayActorError as err:
        role = _ROLES.get(getattr(err, "actor_id", None) or "", "unknown")
        if getattr(err, "_actor_init_failed", False):
            raise ActorStartFailed(role, err) from err
        raise ActorDied(role, err) from err


class BusyLedger:
    """The start and end (wall clock) of every call each actor rank runs, sent by the actor
    itself (see `metered`), so the driver can tell, per step, how long each role sat idle:
    time with no call running on the rank. A call that has begun and not yet ended counts as
    busy up to the window's end (its end may still be on its way). The weight sync is not
    metered (UNMETERED), so a rank waiting in it for the other side counts as idle."""

    def __init__(self):
        self.spans: dict[tuple[str, int], list[list[float | None]]] = {}

    def begin(self, key: tuple[str, int], t: float) -> None:
        self.spans.setdefault(key, []).append([t, None])

    def end(self, key: tuple[str, int], t: float) -> None:
        self.spans[key][-1][1] = t

    def busy(self, since: float, until: float) -> dict[tuple[str, int], float]:
        """Busy seconds of each (role, rank) within [since, until]; spans that ended by
        `until` are dropped (windows come in order)."""
        out = {}
        for key, spans in self.spans.items():
            out[key] = sum(
                max(0.0, min(until if e is None else e, until) - max(s, since)) for s, e in spans
            )
            self.spans[key] = [sp for sp in spans if sp[1] is None or sp[1] > until]
        return out


#: Actor methods that are not a role's work: probes asked once at start, and the weight sync,
#: whose collective mostly waits for the other side (an engine enters it as soon as its batch
#: is done, then waits for the policy's update to end): that wait is idle time, and the
#: transfer itself is timing/sync.
UNMETERED = frozenset(
    {
        "ping",
        "perf_info",
        "peak_rss_mb",
        "weight_specs",
        "init_weight_sync",
        "broadcast_weights",
        "receive_weights",
    }
)


def metered(actor_cls: type[T], role: str, ledger) -> type[T]:
    """`actor_cls` whose public methods tell `ledger` (a BusyLedger actor) when they begin and
    end, as (role, rank); a method called by another one is part of its caller's span. The
    messages are fire-and-forget: a call waits for neither."""

    def wrap(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            self._metered_depth = getattr(self, "_metered_depth", 0) + 1
            if self._metered_depth == 1:
                ledger.begin.remote(self._metered_key, time.time())
            try:
                return fn(self, *args, **kwargs)
            finally:
                self._metered_depth -= 1
                if self._metered_depth == 0:
                    ledger.end.remote(self._metered_key, time.time())

        return method

    def __init__(self, info: RankInfo, *args, **kwargs):
        self._metered_key = (role, info.rank)
        actor_cls.__init__(self, info, *args, **kwargs)

    methods = {
        name: wrap(fn)
        for name, fn in inspect.getmembers(actor_cls, inspect.isfunction)
        if not name.startswith("_") and name not in UNMETERED
    }
    return type(actor_cls.__name__, (actor_cls,), {"__init__": __init__, **methods})


class IdleClock:
    """The driver's side of a BusyLedger: `idle(since, until)` -> timing/idle/<role>, the
    seconds within the window that the role's ranks (their mean) ran no call."""

    def __init__(self):
        self.ledger = ray.remote(num_cpus=0)(BusyLedger).remote()
        #: time.time() - time.perf_counter(): the loops time their steps on perf_counter.
        self.offset = time.time() - time.perf_counter()

    def idle(self, since: float, until: float) -> dict[str, float]:
        """The window [since, until] in time.perf_counter() seconds, as the loops time steps."""
        window = until - since  # as the caller measured it (the wall clock rounds coarser)
        since, until = since + self.offset, until + self.offset
        by_role: dict[str, list[float]] = {}
        for (role, _), busy in gather([self.ledger.busy.remote(since, until)])[0].items():
            by_role.setdefault(role, []).append(min(window, max(0.0, window - busy)))
        return {f"timing/idle/{role}": sum(v) / len(v) for role, v in sorted(by_role.items())}

    def close(self) -> None:
        ray.kill(self.ledger)


class ClusterPlacement:
    """A PlacementPlan made real: one placement group per pool of the plan, every bundle pinned
    to its planned node through the `ray.io/node-id` label (`bundle_label_selector`), all
    reserved before any actor starts; and the run's IdleClock, which every group placed here
    reports its ranks' calls to. `remove()` gives them back."""

    def __init__(self, plan: PlacementPlan, timeout_s: float = 600):
        self.plan = plan
        self.clock = IdleClock()
        self.groups = {
            pool: placement_group(
                [b.resources for b in bundles],
                strategy="PACK",
                bundle_label_selector=[{NODE_ID_LABEL: b.node} for b in bundles],
            )
            for pool, bundles in plan.bundles.items()
        }
        refs = [g.ready() for g in self.groups.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            self.remove()
            raise RuntimeError(
                f"the cluster did not grant the planned bundles within {timeout_s:.0f}s "
                f"(busy with other work?); available: {ray.available_resources()}\n{plan.table()}"
            )

    def slots(self, role: str) -> list[tuple[Any, int, float, float]]:
        """(placement group, bundle index, num_cpus, num_gpus) of each rank of `role`."""
        return [(self.groups[s.pool], s.bundle, s.cpus, s.gpus) for s in self.plan.role_slots(role)]

    def remove(self) -> None:
        for group in self.groups.values():
            remove_placement_group(group)
        self.groups = {}
        self.clock.close()


def start_placement(cfg: RunConfig, timeout_s: float = 600) -> ClusterPlacement:
    """Plan the run on the live Ray nodes, print the plan, refuse one that cannot fit
    (rlhf.placement.PlacementError, before any actor starts) and reserve its bundles."""
    plan = plan_placement(cfg, nodes_from_ray(ray.nodes(), cfg.cluster))
    print(plan.table(), flush=True)
    plan.check()
    return ClusterPlacement(plan, timeout_s)


class ActorGroup(Generic[T]):
    """`resources.world_size` actors of `actor_cls`, each in its own placement-group bundle:
    the bundles `placement` planned for `role`, else a placement group of its own (PACK)."""

    def __init__(
        self,
        role: str,
        actor_cls: type[T],
        resources: RoleResources,
        *args: Any,
        timeout_s: float = 600,
        placement: ClusterPlacement | None = None,
    ):
        self.role = role
        self.world_size = resources.world_size
        self._owns_placement = placement is None
        slots = (
            self._own_slots(resources, timeout_s) if placement is None else placement.slots(role)
        )
        if len(slots) != self.world_size:
            raise RuntimeError(
                f"role {role}: the placement plan has {len(slots)} ranks, the role {self.world_size}"
            )
        self.placement, self.bundle_indices = slots[0][0], [s[1] for s in slots]
        if placement is not None:
            actor_cls = metered(actor_cls, role, placement.clock.ledger)
        remote_cls = ray.remote(actor_cls)
        master_addr = rank0_address(self.placement, self.bundle_indices[0])
        master_port = free_port("127.0.0.1" if master_addr == "127.0.0.1" else "")
        self.actors: list[Any] = []
        for rank, (group, bundle, cpus, gpus) in enumerate(slots):
            info = RankInfo(rank, self.world_size, master_addr, master_port, local_rank=0)
            options = {
                "num_cpus": cpus,
                "num_gpus": gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=bundle
                ),
                "name": None,
            }
            actor = remote_cls.options(**options).remote(info, *args)
            _ROLES[actor._actor_id.hex()] = role
            self.actors.append(actor)

    def _own_slots(self, resources: RoleResources, timeout_s: float) -> list[tuple]:
        bundle = {"CPU": resources.cpus_per_rank}
        if resources.gpus_per_rank:
            bundle["GPU"] = resources.gpus_per_rank
        group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(
                f"role {self.role}: the cluster cannot place {self.world_size} x {bundle} within {timeout_s:.0f}s "
                f"(available: {ray.available_resources()})"
            )
        cpus, gpus = resources.cpus_per_rank, resources.gpus_per_rank
        return [(group, rank, cpus, gpus) for rank in range(self.world_size)]

    def call(self, fn: Callable[[Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """fn(actor) -> ref for every rank, e.g. `group.call(lambda a: a.ping.remote())`."""
        return [fn(actor) for actor in self.actors]

    def call_each(
        self, fn: Callable[[Any, Any], ray.ObjectRef], per_rank: Sequence[Any]
    ) -> list[ray.ObjectRef]:
        """fn(actor, item) with one item per rank."""
        if len(per_rank) != self.world_size:
            raise ValueError(f"role {self.role}: {len(per_rank)} items for {self.world_size} ranks")
        return [fn(actor, item) for actor, item in zip(self.actors, per_rank, strict=True)]

    def gather(self, refs: Sequence[ray.ObjectRef]) -> list[Any]:
        """Wait for refs (see the module-level `gather`)."""
        return gather(refs)

    def perf_info(self) -> list[dict]:
        """Each rank's Worker.perf_info (model shape and device peak), for the FLOPs model."""
        return gather(self.call(lambda a: a.perf_info.remote()))

    def peak_rss_mb(self) -> list[float]:
        """Each rank's peak resident memory (MiB)."""
        return gather(self.call(lambda a: a.peak_rss_mb.remote()))

    def per_token_forward(self, parts: list, pad_id: int, micro: int) -> list[ray.ObjectRef]:
        """Each rank's per-token forward (Worker.per_token: the reference's log-probs, the
        policy's, the critic's values) on its share of a rollout, given as the engines' output
        refs `parts`: they reach the ranks unresolved, so each starts when the rollout is done,
        with no driver round trip. Per rank, a list of micro-batch tensors."""
        specs = [(pad_id, r, self.world_size, micro) for r in range(self.world_size)]
        return self.call_each(lambda a, spec: a.forward_rollout.remote(spec, *parts), specs)

    def pids(self) -> list[int]:
        return [info["pid"] for info in gather(self.call(lambda a: a.ping.remote()))]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._owns_placement:  # planned bundles belong to the run's ClusterPlacement
            remove_placement_group(self.placement)


class WeightSync:
    """The policy -> rollout sync groups, wired once: rank 0 of the policy is the sender, each
    rollout engine a receiver (see actors.weight_sync), on the transport `transports` names
    for it (PlacementPlan.sync_transports; default "auto": NCCL on GPUs, else gloo). The
    engines of one transport share a group with the sender."""

    def __init__(
        self, policy: ActorGroup, rollout: ActorGroup, transports: list[str] | None = None
    ):
        self.policy, self.rollout = policy, rollout
        self.transports = transports or ["auto"] * rollout.world_size
        if len(self.transports) != rollout.world_size:
            raise ValueError(f"{len(self.transports)} transports for {rollout.world_size} engines")
        self.specs = gather([policy.actors[0].weight_specs.remote()])[0]
        addr = rank0_address(policy.placement, policy.bundle_indices[0])
        host = "127.0.0.1" if addr == "127.0.0.1" else ""
        groups, refs = [], []
        for transport in dict.fromkeys(self.transports):
            members = [i for i, t in enumerate(self.transports) if t == transport]
            port, world = free_port(host), 1 + len(members)
            groups.append((port, world, transport))
            refs += [
                rollout.actors[i].init_weight_sync.remote(addr, port, world, 1 + k, transport)
                for k, i in enumerate(members)
            ]
        refs += policy.call(lambda a: a.init_weight_sync.remote(addr, groups))
        gather(refs)

    def submit(self) -> list[ray.ObjectRef]:
        """Queue a transfer of the policy's weights to every engine (behind whatever each actor
        is already running, e.g. the train step that produces them); refs of the tensors sent /
        received per actor."""
        sent = self.policy.call(lambda a: a.broadcast_weights.remote())
        return sent + self.rollout.call(lambda a: a.receive_weights.remote(self.specs))

    def push(self) -> list[int]:
        """Send the policy's current weights to every engine; returns tensors sent / received."""
        return gather(self.submit())


class SharedWeights:
    """The hybrid engine's sync (roles.rollout.hybrid): the engines are the policy's own
    actors, sampling with its current weights, so nothing is sent."""

    def submit(self) -> list[ray.ObjectRef]:
        return []

    def push(self) -> list[int]:
        return []


def rank0_address(placement, bundle_index: int = 0) -> str:
    """Where rank 0 of a group runs: 127.0.0.1 on a single-node cluster (nothing leaves the
    loopback), else the IP of the node that holds rank 0's bundle of the placement group."""
    if _is_local():
        return "127.0.0.1"
    node_id = ray.util.placement_group_table(placement)["bundles_to_node_id"][bundle_index]
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def _is_local() -> bool:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) <= 1


# ----------------------------------------------------------------------------- one group per role
#
# Every call the loops make on an actor is a method here. `submit_*` methods and those typed
# `-> list[ray.ObjectRef]` return futures (one per rank, unless said otherwise), so the caller
# decides what runs concurrently; the others wait for their result.


class TrainerGroup(ActorGroup[T]):
    """Ranks of a DeepSpeed trainer (the policy, the critic)."""

    def submit_train_step(self, per_rank: list[tuple[list, list]]) -> list[ray.ObjectRef]:
        """One optimizer step; per rank (micro-batches, their per-batch extra input)."""
        return self.call_each(lambda a, x: a.train_step.remote(*x), per_rank)

    def submit_save(self, path: str, tag: str) -> list[ray.ObjectRef]:
        return self.call(lambda a: a.save_checkpoint.remote(path, tag))

    def submit_load(self, path: str, tag: str) -> list[ray.ObjectRef]:
        return self.call(lambda a: a.load_checkpoint.remote(path, tag))

    def save_checkpoint(self, path: str, tag: str) -> None:
        self.gather(self.submit_save(path, tag))

    def load_checkpoint(self, path: str, tag: str) -> int:
        return self.gather(self.submit_load(path, tag))[0]


class PolicyGroup(TrainerGroup[PolicyTrainer]):
    def __init__(self, cfg: RunConfig, total_steps: int, placement: ClusterPlacement | None = None):
        res = cfg.roles.policy.resources
        spec = trainer_spec(cfg, "policy")
        super().__init__("policy", PolicyTrainer, res, spec, total_steps, placement=placement)

    def train_step(self, per_rank: list[tuple[list, list]]) -> list[StepResult]:
        return self.gather(self.submit_train_step(per_rank))

    def eval_step(self, per_rank: list[tuple[list, list]]) -> list[dict[str, float]]:
        return self.gather(self.call_each(lambda a, x: a.eval_step.remote(*x), per_rank))

    def generate(
        self, per_rank: list, step: int | None, sampling: RolloutConfig | None = None
    ) -> list[ray.ObjectRef]:
        """The hybrid engine: each rank samples its prompt batch on its own weights."""
        return self.call_each(lambda a, b: a.generate.remote(b, step, sampling), per_rank)

    def export(self, out_dir: str, merge: bool) -> str:
        return self.gather(self.call(lambda a: a.export.remote(out_dir, merge)))[0]

    def parameter_digest(self) -> list[float]:
        return self.gather(self.call(lambda a: a.parameter_digest.remote()))[0]


class CriticGroup(TrainerGroup[CriticTrainer]):
    def __init__(self, cfg: RunConfig, total_steps: int, placement: ClusterPlacement | None = None):
        res = cfg.roles.critic.resources
        spec = trainer_spec(cfg, "critic")
        super().__init__("critic", CriticTrainer, res, spec, total_steps, placement=placement)


class ReferenceGroup(ActorGroup[ReferenceModel]):
    def __init__(self, cfg: RunConfig, placement: ClusterPlacement | None = None):
        res = cfg.roles.reference.resources
        spec = reference_spec(cfg)
        super().__init__("reference", ReferenceModel, res, spec, placement=placement)

    def logps(self, batches: list) -> list[ray.ObjectRef]:
        """Submit batches round-robin over the ranks; one ref per rank that got any."""
        shards = [batches[r :: self.world_size] for r in range(self.world_size)]
        return [a.logps.remote(s) for a, s in zip(self.actors, shards, strict=True) if s]

    def collect(self, refs: list[ray.ObjectRef], n: int) -> list[RefLogps]:
        """Undo the round-robin of `logps` for n batches."""
        shards = self.gather(refs)
        out: list[RefLogps | None] = [None] * n
        for r, shard in enumerate(shards):
            out[r :: self.world_size] = shard
        return out  # type: ignore[return-value]


class RolloutGroup(ActorGroup[RolloutGenerator]):
    def __init__(self, cfg: RunConfig, placement: ClusterPlacement | None = None):
        res = cfg.roles.rollout.resources
        spec = engine_spec(cfg)
        super().__init__("rollout", RolloutGenerator, res, spec, placement=placement)

    def generate(
        self, per_engine: list, step: int | None, sampling: RolloutConfig | None = None
    ) -> list[ray.ObjectRef]:
        """Each engine samples its prompt batch (seeded by `step`; `sampling` overrides the
        run's roles.rollout settings, e.g. for evaluation)."""
        return self.call_each(lambda a, b: a.generate.remote(b, step, sampling), per_engine)


class RewardGroup(ActorGroup[RewardModel]):
    def __init__(self, cfg: RunConfig, placement: ClusterPlacement | None = None):
        res, spec = cfg.roles.reward.resources, reward_spec(cfg)
        super().__init__("reward", RewardModel, res, spec, placement=placement)

    def score(
        self, prompts: list[str], responses: list[str], fields: list[dict] | None = None
    ) -> ray.ObjectRef:
        """Scores of the responses (with their rows' fields), on the first rank (one ref)."""
        return self.actors[0].score.remote(prompts, responses, fields)
