"""Placement plans (rlhf.placement) and their realisation on Ray (actors.groups).

Pure tests: memory estimates against hand-derived numbers, plans that fit, and refusals that
name the role. Ray tests: a multi-node `ray.cluster_utils.Cluster` with fake GPUs (CUDA is
never touched), where trivial actors report the node and GPU ids they got: they must match
the plan.
"""

from __future__ import annotations

import os

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.placement import (
    GIB,
    NodeSpec,
    PlacementError,
    estimate_memory,
    lora_params,
    model_facts,
    nodes_from_ray,
    plan_placement,
)


def _cfg(*overrides: str):
    return load_config(None, ["model.name_or_path=builtin:tiny", *overrides])


def _ppo(*overrides: str):
    return _cfg(
        "algorithm=ppo",
        "roles.reward.type=function",
        "roles.reward.function=rlhf.rewards:vader_sentiment",
        "roles.reward.run_in=actor",  # the CPU-only role of these plans (auto: in the driver)
        "ppo.estimator=grpo",
        "roles.rollout.n_samples_per_prompt=2",
        *overrides,
    )


SEVEN_B = ["model.name_or_path=my-org/my-7b", "model.num_parameters=7.0e9"]


# ----------------------------------------------------------------------------- memory


def test_7b_bf16_full_finetune_zero0_adamw_is_112_gb():
    """Hand-derived: 7e9 * (2 bf16 weights + 2 grads + 4 fp32 master + 8 Adam m, v) bytes."""
    cfg = _cfg(*SEVEN_B, "train.precision=bf16", "roles.policy.resources.gpus_per_rank=1")
    est = estimate_memory(cfg, "policy")
    assert (est.weights, est.grads, est.optimizer) == (14e9, 14e9, 84e9)
    assert est.static == 7e9 * (2 + 2 + 4 + 8) == 112e9
    assert est.activations == 0  # architecture unknown from num_parameters alone


def test_zero_stages_shard_over_the_world_size_and_offload_moves_the_optimizer():
    base = [
        *SEVEN_B,
        "train.precision=bf16",
        "roles.policy.resources.ranks_per_node=4",
        "train.micro_batch_size=2",
    ]
    stage = {s: estimate_memory(_cfg(*base, f"train.zero_stage={s}"), "policy") for s in (1, 2, 3)}
    assert (stage[1].weights, stage[1].grads, stage[1].optimizer) == (14e9, 14e9, 21e9)
    assert (stage[2].weights, stage[2].grads, stage[2].optimizer) == (14e9, 3.5e9, 21e9)
    assert (stage[3].weights, stage[3].grads, stage[3].optimizer) == (3.5e9, 3.5e9, 21e9)
    off = estimate_memory(
        _cfg(*base, "train.zero_stage=2", "train.offload_optimizer=true"), "policy"
    )
    assert off.optimizer == 0 and off.host == 21e9
    eight_bit = estimate_memory(
        _cfg(*SEVEN_B, "train.precision=bf16", "train.optimizer=adamw_8bit"), "policy"
    )
    assert eight_bit.optimizer == 7e9 * (2 + 4)
    fp32 = estimate_memory(_cfg(*SEVEN_B, "train.precision=fp32"), "policy")
    assert fp32.static == 7e9 * (4 + 4 + 8)  # no master copy


def test_lora_and_qlora_on_llama2_7b_match_hand_numbers():
    base = [
        "model.name_or_path=meta-llama/Llama-2-7b-hf",
        "train.precision=bf16",
        "roles.policy.resources.gpus_per_rank=1",
        "model.lora.r=16",
        "model.lora.target_modules=[q_proj, v_proj]",
    ]
    cfg = _cfg(*base)
    adapter = 32 * 2 * 16 * (4096 + 4096)  # layers x (q, v) x r x (in + out)
    assert lora_params(model_facts(cfg.model), cfg.model.lora) == adapter == 8_388_608
    est = estimate_memory(cfg, "policy")
    assert est.trainable == adapter
    assert est.grads == adapter * 2 and est.optimizer == adapter * (8 + 4)
    assert est.weights == 6_738_415_616 * 2 + adapter * 2
    q = _cfg(*base, "model.quantization.double_quant=true")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q,k,v,o + gate,up,down
    other = 6_738_415_616 - linear  # embeddings, lm_head, norms stay 16-bit
    expected = linear * (0.5 + 0.127 / 8) + other * 2 + adapter * 2
    assert estimate_memory(q, "policy").weights == pytest.approx(expected)


def test_frozen_roles_hold_weights_only():
    cfg = _cfg(*SEVEN_B, "algorithm=dpo", "roles.reference.resources.gpus_per_rank=1")
    ref = estimate_memory(cfg, "reference")
    assert (ref.weights, ref.grads, ref.optimizer) == (14e9, 0, 0)


def test_rollout_takes_its_vllm_share_of_each_gpu():
    cfg = _ppo(
        "model.name_or_path=meta-llama/Llama-2-7b-hf",
        "roles.rollout.resources.gpus_per_rank=2",
        "roles.rollout.tensor_parallel_size=2",
        "roles.rollout.gpu_memory_utilization=0.5",
        "cluster.gpu_memory_gib=80",
    )
    est = estimate_memory(cfg, "rollout")
    assert est.weights == 6_738_415_616 * 2
    assert est.total == pytest.approx(0.5 * 80 * GIB * 2)  # weights + KV cache = the budget


@pytest.mark.parametrize(
    ("name", "expected", "rel"),
    [
        ("meta-llama/Llama-2-7b-hf", 6.74e9, 0.01),
        ("mistralai/Mistral-7B-v0.1", 7.24e9, 0.01),
        ("cyberagent/open-calm-7b", 6.9e9, 0.02),
        ("cyberagent/open-calm-small", 0.16e9, 0.05),
        ("gpt2", 124e6, 0.01),
        ("lvwerra/gpt2-imdb", 124e6, 0.01),
        ("distilbert-base-uncased", 67e6, 0.01),
        ("lvwerra/distilbert-imdb", 67e6, 0.01),
        ("builtin:smollm2-135m-instruct", 134.5e6, 0.01),
    ],
)
def test_well_known_models_are_counted_offline(name, expected, rel):
    kind = "reward" if "distilbert" in name else "causal"
    facts = model_facts(load_config(None, [f"model.name_or_path={name}"]).model, kind)
    assert facts.params == pytest.approx(expected, rel=rel)


def test_unknown_model_asks_for_num_parameters():
    cfg = _cfg("model.name_or_path=some-org/unknown-model")
    with pytest.raises(PlacementError, match=r"set model\.num_parameters"):
        estimate_memory(cfg, "policy")


# ----------------------------------------------------------------------------- plans

TWO_NODES = ["cluster.nodes=2", "cluster.gpus_per_node=2", "cluster.cpus_per_node=8"]


def test_two_node_colocated_plan_fits_and_shares_gpus():
    cfg = _ppo(
        *TWO_NODES,
        "cluster.gpu_memory_gib=80",
        "roles.placement=colocate",
        "roles.policy.resources.num_nodes=2",
        "roles.policy.resources.ranks_per_node=2",
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.reference.resources.gpus_per_rank=0.2",
        "roles.rollout.resources.num_nodes=2",
        "roles.rollout.resources.ranks_per_node=2",
        "roles.rollout.resources.gpus_per_rank=0.3",
        "train.micro_batch_size=2",
    )
    plan = plan_placement(cfg).check()
    assert plan.mode == "colocate" and plan.problems() == []
    where = {(s.role, s.rank): (s.node, s.devices) for s in plan.slots}
    assert where[("policy", 3)] == ("node1", (1,)) and where[("rollout", 3)] == ("node1", (1,))
    assert where[("reference", 0)] == ("node0", (0,)) and where[("reward", 0)][1] == ()
    use = plan.gpu_use()
    assert use[("node0", 0)]["share"] == pytest.approx(1.0)  # policy .5 + rollout .3 + ref .2
    assert len(plan.bundles["colocated"]) == 4  # one {"GPU": 1} bundle per shared GPU
    assert all(b.gpus == 1 for b in plan.bundles["colocated"])
    table = plan.table()
    assert "placement plan: colocate" in table and "GPU node0 gpu0: share 1.00" in table


def test_disaggregated_plan_gives_each_role_its_own_gpus():
    cfg = _ppo(
        *TWO_NODES,
        "roles.placement=disaggregate",
        "roles.policy.resources.ranks_per_node=2",
        "roles.policy.resources.gpus_per_rank=1",
        "roles.reference.resources.gpus_per_rank=1",
        "roles.rollout.resources.gpus_per_rank=1",
        "train.micro_batch_size=2",
    )
    plan = plan_placement(cfg).check()
    owners = {}
    for s in plan.slots:
        for d in s.devices:
            owners.setdefault((s.node, d), set()).add(s.role)
    assert all(len(roles) == 1 for roles in owners.values()) and len(owners) == 4
    assert set(plan.bundles) == {"policy", "reference", "rollout", "reward"}
    assert [s.devices for s in plan.slots if s.role == "reward"] == [()]


def test_a_reward_scored_in_the_driver_gets_no_slot():
    plan = plan_placement(_ppo(*TWO_NODES, "roles.reward.run_in=auto")).check()
    assert {s.role for s in plan.slots} == {"policy", "reference", "rollout"}
    assert "reward" not in plan.bundles


def test_a_hybrid_rollout_runs_in_the_policy_ranks():
    """roles.rollout.hybrid: no rollout slot; each policy rank's peak is the larger of its
    training activations and its share of the rollout's KV cache (Llama-2-7B: 4096-wide K and
    V in each of 32 layers, bf16), as the two alternate."""
    hybrid = ["roles.rollout.hybrid=true", "roles.policy.resources.gpus_per_rank=1"]
    plan = plan_placement(_ppo(*TWO_NODES, *hybrid)).check()
    assert {s.role for s in plan.slots} == {"policy", "reference", "reward"}  # _ppo: reward actor
    assert "rollout" not in plan.estimates
    # 64 prompts x 8 samples over 2 ranks = 256 rows of 512 + 1024 tokens each.
    grow = [
        "model.name_or_path=meta-llama/Llama-2-7b-hf",
        "train.global_batch_size=64",
        "train.micro_batch_size=4",
        "roles.rollout.n_samples_per_prompt=8",
        "roles.policy.resources.ranks_per_node=2",
        "roles.policy.resources.gpus_per_rank=1",
        "data.max_length=1536",
        "data.max_prompt_length=512",
        "roles.rollout.max_new_tokens=1024",
        "train.precision=bf16",
    ]
    cfg = _ppo(*grow, "roles.rollout.hybrid=true")
    separate = estimate_memory(_ppo(*grow), "policy")
    est = estimate_memory(cfg, "policy")
    kv = 2 * 32 * 4096 * 2 * 256 * (512 + 1024)
    assert est.activations == max(separate.activations, kv)
    assert "hybrid rollout engine" in est.notes


def test_refusals_name_the_role_and_the_shortfall():
    def problems(*overrides):
        return "\n".join(plan_placement(_ppo(*TWO_NODES, *overrides)).problems())

    assert "roles.policy: num_nodes=3, but the cluster has 2 node(s) with GPUs" in problems(
        "roles.policy.resources.num_nodes=3",
        "roles.policy.resources.gpus_per_rank=0.5",
        "train.global_batch_size=12",
        "train.micro_batch_size=2",
    )
    tp = problems("roles.rollout.tensor_parallel_size=4", "roles.rollout.resources.gpus_per_rank=4")
    assert "roles.rollout: tensor_parallel_size=4 > 2 GPUs per node" in tp
    shares = problems(
        "roles.policy.resources.gpus_per_rank=0.6", "roles.reference.resources.gpus_per_rank=0.6"
    )
    assert "GPU shares sum to 1.20 > 1 (policy[0] 0.6, reference[0] 0.6)" in shares
    gpus = problems(
        "roles.placement=disaggregate",
        "roles.policy.resources.ranks_per_node=2",
        "roles.policy.resources.gpus_per_rank=1",
        "roles.reference.resources.ranks_per_node=2",
        "roles.reference.resources.gpus_per_rank=1",
        "roles.rollout.resources.gpus_per_rank=1",
        "train.micro_batch_size=2",
    )
    assert "roles.rollout: no node has 1 free GPU(s)" in gpus
    mismatch = problems(
        "roles.rollout.tensor_parallel_size=2", "roles.rollout.resources.gpus_per_rank=1"
    )
    assert "roles.rollout: tensor_parallel_size=2 needs gpus_per_rank=2" in mismatch
    cpus = problems("cluster.cpus_per_node=1", "roles.reward.resources.cpus_per_rank=2")
    assert "roles.reward: no node has 2 free CPU(s)" in cpus


def test_weight_sync_transport_follows_the_placement():
    """PlacementPlan.sync_transports for every placement: gloo on CPU, CUDA IPC for an engine
    on the GPU of the policy's rank 0 (the sender), NCCL across GPUs, nothing for the hybrid
    engine; a plan that would put two ranks of the NCCL communicator on one GPU is refused."""
    one_gpu = ["cluster.nodes=1", "cluster.gpus_per_node=1", "cluster.cpus_per_node=8"]

    def plan(*overrides):
        return plan_placement(_ppo(*overrides))

    assert plan().sync_transports() == ["gloo"]  # CPU roles
    assert plan("roles.rollout.resources.ranks_per_node=2").sync_transports() == ["gloo"] * 2
    shared = plan(
        *one_gpu,
        "roles.placement=colocate",
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.rollout.resources.ranks_per_node=2",
        "roles.rollout.resources.gpus_per_rank=0.25",
    )
    assert shared.problems() == [] and shared.sync_transports() == ["cuda_ipc", "cuda_ipc"]
    two_nodes = plan(
        *TWO_NODES,
        "roles.placement=colocate",
        "roles.policy.resources.num_nodes=2",
        "roles.policy.resources.ranks_per_node=2",
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.rollout.resources.num_nodes=2",
        "roles.rollout.resources.ranks_per_node=2",
        "roles.rollout.resources.gpus_per_rank=0.5",
        "train.micro_batch_size=2",
    )
    # Engine r shares the GPU of policy rank r: only engine 0 shares the sender's.
    assert two_nodes.problems() == []
    assert two_nodes.sync_transports() == ["cuda_ipc", "nccl", "nccl", "nccl"]
    apart = plan(
        *TWO_NODES,
        "roles.placement=disaggregate",
        "roles.policy.resources.gpus_per_rank=1",
        "roles.rollout.resources.ranks_per_node=2",
        "roles.rollout.resources.gpus_per_rank=1",
    )
    assert apart.problems() == [] and apart.sync_transports() == ["nccl", "nccl"]
    hybrid = plan(*TWO_NODES, "roles.rollout.hybrid=true", "roles.policy.resources.gpus_per_rank=1")
    assert hybrid.sync_transports() == []
    crowded = plan(
        *TWO_NODES,
        "roles.placement=disaggregate",
        "roles.policy.resources.gpus_per_rank=1",
        "roles.rollout.resources.ranks_per_node=2",
        "roles.rollout.resources.gpus_per_rank=0.5",
    )
    assert crowded.sync_transports() == ["nccl", "nccl"]
    assert (
        "node node0 GPU 1: rollout[0] and rollout[1] would be two ranks of one NCCL weight-sync "
        "communicator on one GPU" in "\n".join(crowded.problems())
    )


def test_memory_overflow_is_refused_naming_the_roles():
    args = [
        *SEVEN_B,
        "train.precision=bf16",
        "roles.policy.resources.gpus_per_rank=1",
        "cluster.gpus_per_node=8",
        "cluster.gpu_memory_gib=80",
    ]
    plan = plan_placement(_cfg(*args))
    with pytest.raises(
        PlacementError, match=r"roles\.policy on node node0 GPU 0: 104\.3 GiB"
    ) as err:
        plan.check()
    assert isinstance(err.value, ConfigError)
    zero3 = _cfg(
        *args,
        "train.zero_stage=3",
        "roles.policy.resources.ranks_per_node=8",
        "train.micro_batch_size=1",
    )
    assert plan_placement(zero3).problems() == []  # 112 GB / 8 GPUs fits


def test_sleeping_rollout_engines_take_the_max_not_the_sum():
    base = [
        "cluster.gpus_per_node=1",
        "cluster.gpu_memory_gib=80",
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.rollout.resources.gpus_per_rank=0.5",
        "data.max_length=1024",
    ]
    awake = plan_placement(_ppo(*base, "ppo.kl_coef=0")).gpu_use()[("node0", 0)]["bytes"]
    asleep = plan_placement(_ppo(*base, "ppo.kl_coef=0", "roles.rollout.sleep=true"))
    u = asleep.gpu_use()[("node0", 0)]
    assert u["bytes"] == pytest.approx(u["static"] + max(u["act"], u["rollout"]))
    assert u["bytes"] < awake


def test_undeclared_cluster_checks_structure_only():
    plan = plan_placement(_ppo()).check()  # CPU roles, nothing declared: fits
    assert {s.node for s in plan.slots} == {"node0"} and "cpu" in plan.table()


def test_nodes_from_ray_reads_alive_nodes():
    nodes = nodes_from_ray(
        [
            {"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1", "Alive": True,
             "Resources": {"CPU": 8.0, "GPU": 4.0, "memory": 64 * GIB}},
            {"NodeID": "b" * 56, "Alive": False, "Resources": {"CPU": 8.0}},
        ]
    )  # fmt: skip
    assert nodes == [NodeSpec("a" * 56, "10.0.0.1", 8.0, 4, 64 * GIB, None, live=True)]


# ----------------------------------------------------------------------------- on Ray


class Where:
    """A trivial rank (no torch, no CUDA): reports where Ray put it."""

    def __init__(self, info):
        self.info = info

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        return {"rank": self.info.rank, "node": ctx.get_node_id(), "gpus": sorted(gpus)}

    def ping(self) -> dict:
        return {"rank": self.info.rank, "pid": os.getpid()}


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """Head (2 CPU, no GPU) + two worker nodes with 2 CPUs and 2 fake GPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, configure_logging=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _land(cfg):
    """Plan on the live nodes, reserve, start a Where group per role; return plan + reports."""
    import ray

    from actors.groups import ActorGroup, ClusterPlacement

    plan = plan_placement(cfg, nodes_from_ray(ray.nodes())).check()
    placement = ClusterPlacement(plan, timeout_s=60)
    groups = [
        ActorGroup(role, Where, plan.resources[role], placement=placement)
        for role in plan.resources
    ]
    try:
        reports = {
            (g.role, r["rank"]): r
            for g in groups
            for r in ray.get([a.where.remote() for a in g.actors])
        }
    finally:
        for g in groups:
            g.shutdown()
        placement.remove()
    return plan, reports


@pytest.mark.slow
def test_roles_land_where_the_plan_says(fake_gpu_cluster):
    colocated = _ppo(
        "ppo.kl_coef=0.05",
        "roles.placement=colocate",
        "train.micro_batch_size=2",
        *[f"roles.{r}.resources.num_nodes=2" for r in ("policy", "rollout")],
        *[f"roles.{r}.resources.cpus_per_rank=0.5" for r in ("policy", "rollout", "reference")],
        "roles.policy.resources.gpus_per_rank=0.5",
        "roles.rollout.resources.gpus_per_rank=0.4",
        "roles.reference.resources.gpus_per_rank=0.1",
    )
    plan, reports = _land(colocated)
    for s in plan.slots:
        assert reports[(s.role, s.rank)]["node"] == s.node, (s, reports[(s.role, s.rank)])
    by_gpu = {}
    for s in plan.slots:
        if s.devices:
            by_gpu.setdefault((s.node, s.devices), set()).add(
                tuple(reports[(s.role, s.rank)]["gpus"])
            )
    assert all(len(ids) == 1 for ids in by_gpu.values())  # colocated ranks share one GPU
    head = [n.id for n in plan.nodes if n.gpus == 0]
    assert reports[("reward", 0)]["node"] in head  # CPU-only roles stay off the GPU nodes

    disaggregated = _ppo(
        "ppo.kl_coef=0",
        "roles.placement=disaggregate",
        "train.micro_batch_size=4",
        "roles.policy.resources.ranks_per_node=2",
        "roles.policy.resources.gpus_per_rank=1",
        "roles.policy.resources.cpus_per_rank=0.5",
        "roles.rollout.tensor_parallel_size=2",
        "roles.rollout.resources.gpus_per_rank=2",
    )
    plan, reports = _land(disaggregated)
    for s in plan.slots:
        assert reports[(s.role, s.rank)]["node"] == s.node
    policy_node = plan.role_slots("policy")[0].node
    assert all(s.node == policy_node for s in plan.role_slots("policy"))
    assert plan.role_slots("rollout")[0].node != policy_node
    assert len(reports[("rollout", 0)]["gpus"]) == 2  # one engine, tensor parallel over 2 GPUs
    assert reports[("policy", 0)]["gpus"] != reports[("policy", 1)]["gpus"]


@pytest.mark.slow
def test_start_refuses_a_plan_that_cannot_fit_before_any_actor(fake_gpu_cluster):
    import ray

    from actors.groups import start_placement

    before = len(ray.util.placement_group_table())
    cfg = _ppo("roles.rollout.tensor_parallel_size=4", "roles.rollout.resources.gpus_per_rank=4")
    with pytest.raises(PlacementError, match=r"tensor_parallel_size=4 > 2 GPUs per node"):
        start_placement(cfg)
    assert len(ray.util.placement_group_table()) == before


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_engine_sleeps_between_rollouts(tiny_path, tiny_tokenizer, tmp_path):
    import torch

    from actors.base import RankInfo
    from actors.net import free_port
    from actors.rollout import RolloutGenerator
    from rlhf.data import load_datasets, make_collator
    from rlhf.roles import engine_spec

    cfg = load_config(
        None,
        [
            "algorithm=ppo",
            f"model.name_or_path={tiny_path}",
            "roles.reward.type=function",
            "roles.reward.function=rlhf.rewards:vader_sentiment",
            "roles.rollout.backend=vllm",
            "roles.rollout.sleep=true",
            "roles.rollout.gpu_memory_utilization=0.3",
            "roles.rollout.max_new_tokens=8",
            "data.train.limit=8",
        ],
    )
    gen = RolloutGenerator(RankInfo(0, 1, "127.0.0.1", free_port()), engine_spec(cfg))
    prompts, _ = load_datasets(cfg.data, "prompt", tiny_tokenizer, tmp_path)
    batch = make_collator("prompt", tiny_tokenizer.pad_token_id)([prompts[i] for i in range(4)])
    first = gen.generate(batch, 0)
    assert gen.backend.asleep == {"weights", "kv_cache"}
    free_asleep = torch.cuda.mem_get_info()[0]
    gen.backend._wake()
    assert torch.cuda.mem_get_info()[0] < free_asleep  # waking took the memory back
    again = gen.generate(batch, 0)
    assert again.response_ids.shape[0] == first.response_ids.shape[0]
