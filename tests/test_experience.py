"""Experience assembly: rollout -> sequences alignment, and advantages per estimator composed
from the (separately tested) estimators, checked by hand composition."""

from __future__ import annotations

import pytest
import torch

from rlhf.advantages import RunningMeanStd, gae, grpo_advantages
from rlhf.config import load_config
from rlhf.experience import compute_advantages
from rlhf.ops import masked_whiten
from rlhf.rollout import Rollout, experience_inputs, merge_rollouts, sequences

PAD = 0


def _rollout(prompts, responses, index):
    from rlhf.data.collate import pad

    pid = pad(prompts, PAD, left=True)
    pmask = pad([[True] * len(p) for p in prompts], False, left=True, dtype=torch.bool)
    rid = pad(responses, PAD)
    rmask = pad([[True] * len(r) for r in responses], False, dtype=torch.bool)
    return Rollout(
        pid, pmask, rid, rmask, torch.zeros(rid.shape), ["stop"] * len(prompts), torch.tensor(index)
    )


def test_action_mask_marks_exactly_the_response_tokens():
    a = _rollout([[5, 6], [7]], [[8, 9, 10], [11]], [0, 1])
    b = _rollout([[12, 13, 14]], [[15, 16]], [2])
    r = merge_rollouts([a, b], PAD)
    ids, attention, action = sequences(r)
    assert ids.shape == (3, 3 + 3) and action.shape == (3, 5)
    # column t of the action mask scores token t+1
    assert ids[:, 1:][action].tolist() == [8, 9, 10, 11, 15, 16]
    assert (ids[~attention] == PAD).all()
    assert r.prompt_index.tolist() == [0, 1, 2]


def test_each_rank_gets_its_rows_of_the_merged_rollout_in_micro_batches():
    """What a forward rank builds from the engines' outputs (experience_inputs): its share of
    the merged sequences, split evenly over the ranks, in micro-batches, and the first
    response column; together the ranks cover every row once, in order."""
    a = _rollout([[5, 6], [7], [8, 9]], [[10], [11, 12], [13]], [0, 1, 2])
    b = _rollout([[14, 15, 16], [17], [18]], [[19, 20], [21], [22, 23, 24]], [3, 4, 5])
    ids, attention, _ = sequences(merge_rollouts([a, b], PAD))
    seen = []
    for rank in range(2):
        micro_batches, start = experience_inputs((a, b), PAD, rank, 2, 2)
        assert start == 2  # the widest prompt has 3 tokens: column 2 scores the first response
        assert [m[0].shape[0] for m in micro_batches] == [2, 1]  # 3 rows a rank, micro 2
        seen += [row for m in micro_batches for row in zip(*m, strict=True)]
    assert torch.equal(torch.stack([r[0] for r in seen]), ids)
    assert torch.equal(torch.stack([r[1] for r in seen]), attention)
    alone, start = experience_inputs((a,), PAD, 0, 1, 8)
    assert start == 1 and torch.equal(alone[0][0], sequences(a)[0])


def _cfg(*extra):
    return load_config(
        None, ["algorithm=ppo", "roles.reward.type=function", "roles.reward.function=m:f", *extra]
    )


def test_gae_experience_is_kl_shaped_gae_then_whitened():
    cfg = _cfg("ppo.kl_coef=0.1", "ppo.gamma=1.0", "ppo.lam=0.9")
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    logps, ref, values = (torch.randn(2, 4, generator=g) for _ in range(3))
    scores = torch.tensor([1.0, -1.0])
    out = compute_advantages(
        cfg, scores, mask, logps, ref, values, torch.tensor([True, True]), 0.1, None
    )
    rewards = -0.1 * (logps - ref) * mask
    rewards[0, 3] += 1.0
    rewards[1, 3] += -1.0
    adv, returns = gae(rewards, values, mask, 1.0, 0.9)
    torch.testing.assert_close(out.advantages, masked_whiten(adv, mask))
    torch.testing.assert_close(out.returns, returns)
    assert out.metrics["kl/seq"] == pytest.approx(((logps - ref) * mask).sum(-1).mean().item())


def test_grpo_experience_uses_group_normalised_scores():
    cfg = _cfg(
        "ppo.estimator=grpo",
        "roles.rollout.n_samples_per_prompt=2",
        "ppo.kl_coef=0",
        "ppo.whiten_advantages=false",
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    logps = torch.zeros(4, 3)
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    out = compute_advantages(
        cfg, scores, mask, logps, None, None, torch.ones(4, dtype=torch.bool), 0.0, None
    )
    seq = grpo_advantages(scores, 2)  # [-0.707, 0.707, 0, 0]
    expected = seq.unsqueeze(1) * mask  # γ = 1, no KL: every token's return is the outcome
    torch.testing.assert_close(out.advantages, expected)
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages(
            _cfg(), scores, mask, logps, None, None, torch.ones(4, dtype=torch.bool), 0.0, None
        )


@pytest.mark.parametrize(
    "estimator, setting, whitened",
    [
        ("gae", None, True),
        ("grpo", None, False),
        ("rloo", None, False),
        ("reinforce_pp", None, False),  # whitens inside its estimator
        ("grpo", "true", True),
        ("gae", "false", False),
    ],
)
def test_whitening_default_follows_the_estimator(estimator, setting, whitened):
    """ppo.whiten_advantages=null whitens GAE's advantages only; GRPO/RLOO keep their group
    baselines as they are (as TRL), unless whitening is asked for."""
    from rlhf.experience import whitens

    extra = [f"ppo.whiten_advantages={setting}"] if setting else []
    cfg = _cfg(f"ppo.estimator={estimator}", "roles.rollout.n_samples_per_prompt=2", *extra)
    assert whitens(cfg.ppo) is whitened


def test_unanimous_groups_of_binary_rewards_stay_zero_through_the_experience():
    """The simulation of the issue: 0/1 rewards with a reward baseline and normalisation,
    many unanimous groups; with the defaults (no whitening for GRPO/RLOO) none of them gets a
    non-zero advantage on any token, for either estimator."""
    g = torch.Generator().manual_seed(21)
    n, G = 64, 8
    p = torch.rand(n, 1, generator=g).round()  # unanimous-leaning prompts: solved or not
    scores = (torch.rand(n, G, generator=g) < p * 0.97 + 0.015).float().reshape(-1)
    mask = torch.ones(n * G, 4, dtype=torch.bool)
    unanimous = (scores.view(n, G).amax(1) == scores.view(n, G).amin(1)).repeat_interleave(G)
    assert int(unanimous.sum()) >= 8 * G
    for estimator in ("grpo", "rloo"):
        cfg = _cfg(
            f"ppo.estimator={estimator}",
            f"roles.rollout.n_samples_per_prompt={G}",
            "roles.reward.baseline=0.7",
            "roles.reward.normalize=true",
            "ppo.kl_coef=0",
        )
        out = compute_advantages(
            cfg,
            scores,
            mask,
            torch.zeros(n * G, 4),
            None,
            None,
            torch.ones(n * G, dtype=torch.bool),
            0.0,
            RunningMeanStd(),
        )
        assert torch.equal(out.advantages[unanimous], torch.zeros(int(unanimous.sum()), 4))
        assert bool((out.advantages[~unanimous] != 0).all())
