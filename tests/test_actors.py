"""Tier 4: real Ray actors and real DeepSpeed engines on CPU with the tiny model.

Data parallelism must not change the result: 2 ranks under ZeRO-2 or ZeRO-3 take the same
step as 1 rank under ZeRO-0 with the same global batch. A NaN step updates nothing.
"""

from __future__ import annotations

import pytest
import ray
import torch

from actors.groups import PolicyGroup, ReferenceGroup
from actors.run import StepPlan
from rlhf.config import load_config
from rlhf.data import load_split, make_collator


def _cfg(tiny_path, *extra):
    return load_config(
        None,
        [
            f"model.name_or_path={tiny_path}",
            "data.max_length=48",
            "data.train.limit=16",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "train.lr=1e-3",
            "train.lr_scheduler=constant",
            *extra,
        ],
    )


def _steps(cfg, tokenizer, n_steps: int, monkeypatch=None):
    """Run n_steps DPO steps of the same data on a fresh group; return the parameter digest."""
    world = cfg.roles.policy.resources.world_size
    ds = load_split(cfg.data.train, cfg.data, "preference", tokenizer)
    collate = make_collator("preference", tokenizer.pad_token_id)
    plan = StepPlan(len(ds), 8, 2, world, 1, None, 0)
    policy = PolicyGroup(cfg, n_steps)
    reference = ReferenceGroup(cfg)
    try:
        results = []
        for step in range(n_steps):
            per_rank = plan.per_rank(plan.step_indices(step))
            work = []
            for groups in per_rank:
                batches = [collate([ds[i] for i in g]) for g in groups]
                refs = reference.collect(reference.logps(batches), len(batches))
                work.append((batches, refs))
            results.append(policy.train_step(work))
        return policy.parameter_digest(), results
    finally:
        policy.shutdown()
        reference.shutdown()


def test_data_parallel_zero_stages_match_one_rank(ray_local, tiny_path, tiny_tokenizer):
    base_digest, base = _steps(_cfg(tiny_path, "train.zero_stage=0"), tiny_tokenizer, 2)
    for stage in (2, 3):
        cfg = _cfg(
            tiny_path, f"train.zero_stage={stage}", "roles.policy.resources.ranks_per_node=2"
        )
        digest, results = _steps(cfg, tiny_tokenizer, 2)
        assert digest == pytest.approx(base_digest, rel=1e-5), (
            f"ZeRO-{stage} x2 ranks diverged from 1 rank"
        )
        for one, two in zip(base, results, strict=True):
            loss_two = sum(r.metrics["loss"] for r in two) / 2
            assert loss_two == pytest.approx(one[0].metrics["loss"], rel=1e-5)
    initial = base[0][0].metrics["loss"]
    assert base[1][0].metrics["loss"] < initial, "a DPO step on the same batch lowers its loss"


def test_nan_step_updates_nothing(ray_local, tiny_path, tiny_tokenizer, monkeypatch):
    from actors.policy import FAULT_NAN_STEPS

    monkeypatch.setenv(FAULT_NAN_STEPS, "2")
    ray.shutdown()
    ray.init(
        num_cpus=4,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"env_vars": {FAULT_NAN_STEPS: "2"}},
    )
    cfg = _cfg(tiny_path, "train.zero_stage=2", "roles.policy.resources.ranks_per_node=2")
    digest_1, _ = _steps(cfg, tiny_tokenizer, 1)
    digest_2, results = _steps(cfg, tiny_tokenizer, 2)
    assert results[1][0].skipped and results[1][1].skipped, "both ranks skip together"
    assert not results[0][0].skipped
    assert results[1][0].bad_indices, "the offending examples are reported"
    assert digest_2 == digest_1, "the skipped step changed the weights"
    ray.shutdown()
    ray.init(
        num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False
    )


def test_zero3_export_equals_zero0_export(ray_local, tiny_path, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    paths = {}
    for stage, ranks in ((0, 1), (3, 2)):
        cfg = _cfg(
            tiny_path, f"train.zero_stage={stage}", f"roles.policy.resources.ranks_per_node={ranks}"
        )
        group = PolicyGroup(cfg, 1)
        try:
            paths[stage] = group.export(str(tmp_path / f"z{stage}"), merge=True)
        finally:
            group.shutdown()
    a, b = load_file(f"{paths[0]}/model.safetensors"), load_file(f"{paths[3]}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.numel() > 0 for v in b.values()), "ZeRO-3 shards were gathered, not saved empty"


def test_precomputed_reference_logps_equal_on_the_fly(
    ray_local, tiny_path, tiny_tokenizer, tmp_path, monkeypatch
):
    from actors.refcache import ReferenceCache

    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))  # a fresh cache for this test
    cfg = _cfg(tiny_path, "data.train.limit=40", "dpo.precompute_ref_logps=true")
    ds = load_split(cfg.data.train, cfg.data, "preference", tiny_tokenizer)
    collate = make_collator("preference", tiny_tokenizer.pad_token_id)
    plan = StepPlan(len(ds), 8, 2, 1, 1, None, 0)
    reference = ReferenceGroup(cfg)
    try:
        cache = ReferenceCache(cfg, ds, reference, collate, plan.order(0))
        assert not cache.complete
        for step in range(plan.steps_per_epoch):
            for groups in plan.per_rank(plan.step_indices(step)):
                for g in groups:
                    batch = collate([ds[i] for i in g])
                    cached = cache.lookup(batch)
                    live = reference.collect(reference.logps([batch]), 1)[0]
                    torch.testing.assert_close(cached.logps, live.logps, atol=1e-4, rtol=1e-5)
        assert cache.complete and cache.path.exists()
        again = ReferenceCache(cfg, ds, reference, collate, plan.order(0))
        assert again.complete, "a second run reads the cache from disk"
        assert torch.equal(again.table, cache.table)
        assert not torch.isnan(cache.table).any()
    finally:
        reference.shutdown()


class _Exploding:
    """An actor whose constructor raises, as a role's would on a bad model or file."""

    def __init__(self, info, message: str):
        raise ValueError(message)

    def ping(self):
        return "never"


def test_an_actor_that_fails_to_start_reports_its_own_error(ray_local):
    """Not "the actor died ... resume": the role and the actor's own error, one line, and it
    is a set-up error (the CLI prints it as one and exits 2), not a resumable death."""
    from actors.groups import ActorDied, ActorGroup, ActorStartFailed
    from rlhf.config import ConfigError, RoleResources

    group = ActorGroup("critic", _Exploding, RoleResources(), "no such head: 'score'")
    try:
        with pytest.raises(ActorStartFailed) as caught:
            group.gather(group.call(lambda a: a.ping.remote()))
    finally:
        group.shutdown()
    assert (
        str(caught.value) == "the critic actor failed to start: ValueError: no such head: 'score'"
    )
    assert isinstance(caught.value, ConfigError) and not isinstance(caught.value, ActorDied)


def test_busy_ledger_counts_each_ranks_calls_within_the_window():
    """BusyLedger by hand: spans clipped to the window, an open span busy up to its end,
    ended spans dropped once a window has passed them, ranks and roles apart."""
    from actors.groups import BusyLedger

    ledger = BusyLedger()
    ledger.begin(("policy", 0), 0.5)
    ledger.end(("policy", 0), 1.25)  # 0.25 s inside [1, 3]
    ledger.begin(("policy", 0), 1.5)
    ledger.end(("policy", 0), 2.0)  # 0.5 s
    ledger.begin(("policy", 0), 2.75)  # still running: busy up to 3, then on
    ledger.begin(("policy", 1), 0.1)
    ledger.end(("policy", 1), 0.9)  # before the window
    ledger.begin(("rollout", 0), 0.7)  # running through the whole window
    busy = ledger.busy(1.0, 3.0)
    assert busy == pytest.approx({("policy", 0): 1.0, ("policy", 1): 0.0, ("rollout", 0): 2.0})
    ledger.end(("policy", 0), 3.5)
    ledger.end(("rollout", 0), 3.1)
    assert len(ledger.spans[("policy", 0)]) == 1 and not ledger.spans[("policy", 1)]
    busy = ledger.busy(3.0, 4.0)
    assert busy == pytest.approx({("policy", 0): 0.5, ("policy", 1): 0.0, ("rollout", 0): 0.1})
