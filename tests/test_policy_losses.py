"""The policy-loss family of reasoning RL, each against an independent computation: the loss
aggregations by hand (Dr. GRPO's constant normaliser included), GSPO and CISPO against
straightforward float64 implementations of their papers' equations (values and gradients),
all of them against TRL's own GRPO loss (GRPOTrainer._compute_loss, trl 1.16), and DAPO's
soft overlong punishment by hand."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf.advantages import overlong_penalty
from rlhf.losses.ppo import policy_loss
from rlhf.ops import aggregate
from tests.tensors import F64, assert_close, gen

torch.set_num_threads(1)


# ------------------------------------------------------------------ aggregation by hand

LOSS = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 7.0, 7.0, 7.0], [5.0, 5.0, 5.0, 5.0]])
# row 0: 3 tokens; row 1: a length-1 response; row 2: all masked (e.g. a truncated response)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),
        ("seq_mean", (6 / 3 + 4 / 1) / 2),
        ("seq_mean_token_mean", (6 / 3 + 4 / 1) / 2),
        ("seq_mean_token_sum", (6 + 4) / 2),
        # every row counts, the normaliser is B x L = 3 x 8 whatever the masks
        ("seq_mean_token_sum_norm", 10 / (3 * 8)),
    ],
)
def test_aggregation_modes_by_hand(mode, expected):
    assert aggregate(LOSS, MASK, mode, norm_length=8).item() == pytest.approx(expected)
    # all rows masked: 0, never NaN
    assert aggregate(LOSS, torch.zeros_like(MASK), mode, norm_length=8).item() == 0.0


def test_token_sum_norm_needs_its_constant():
    with pytest.raises(ValueError, match="needs norm_length"):
        aggregate(LOSS, MASK, "seq_mean_token_sum_norm")


# ------------------------------------------------------------------ GSPO and CISPO references


def inputs(B=6, T=5, seed=0, spread=0.3):
    g = gen(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.1
    logps = old + torch.randn(B, T, generator=g, dtype=F64) * spread
    adv = torch.randn(B, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 1  # a length-1 response
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return logps, old, adv, mask


def ref_gspo(logps, old, adv, mask, eps_low, eps_high):
    """GSPO, Zheng et al. 2025, eqs. 5 and 7, straightforwardly per sequence: s_i = (π/π_old)^{1/|y|}
    = exp(mean_t (log π - log π_old)); J = mean_i min(s_i A_i, clip(s_i, 1-ε_l, 1+ε_h) A_i);
    loss = -J over the non-empty responses."""
    terms = []
    for i in range(logps.shape[0]):
        m = mask[i]
        if not m.any():
            continue
        s = torch.exp((logps[i][m] - old[i][m]).mean())
        a = adv[i]
        terms.append(-torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a))
    return torch.stack(terms).mean()


def ref_cispo(logps, old, adv, mask, eps_low, eps_high):
    """CISPO, MiniMax-M1 (Chen et al. 2025), eq. 4: J = 1/Σ|o_i| Σ_i Σ_t sg(r̂_i,t) A_i log π_i,t,
    r̂ = clip(r, 1-ε_l, 1+ε_h); loss = -J."""
    total, count = 0.0, 0
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(float(logps[i, t].detach() - old[i, t]))
            w = min(max(r, 1 - eps_low), 1 + eps_high)
            total = total - w * adv[i] * logps[i, t]
            count += 1
    return total / count


def against_reference(kind, aggregation, reference, seed, spread, eps_low, eps_high):
    """Our loss (float32) and the float64 reference on the same inputs, values and gradients
    compared; returns our metrics and the inputs."""
    logps, old, adv, mask = inputs(seed=seed, spread=spread)
    mine = logps.clone().float().requires_grad_(True)
    loss, m = policy_loss(
        mine,
        old.float(),
        adv.float().unsqueeze(1) * mask,
        mask,
        kind=kind,
        clip_eps=eps_low,
        clip_eps_high=eps_high,
        aggregation=aggregation,
    )
    loss.backward()
    ref_in = logps.clone().requires_grad_(True)
    want = reference(ref_in, old, adv, mask, eps_low, eps_high)
    want.backward()
    assert_close(loss, want.item(), rtol=1e-5, atol=1e-6)
    assert_close(mine.grad, ref_in.grad * mask, rtol=1e-4, atol=1e-7)
    return m, mine.grad, (logps, old, mask)


@pytest.mark.parametrize(
    "eps_low, eps_high, spread", [(0.2, 0.2, 0.3), (3e-4, 4e-4, 0.01), (0.1, 0.3, 1.0)]
)
def test_gspo_matches_the_sequence_level_reference(eps_low, eps_high, spread):
    m, _, (logps, old, mask) = against_reference(
        "gspo", "seq_mean_token_mean", ref_gspo, 1, spread, eps_low, eps_high
    )
    seq = [math.exp(float((logps[i][mask[i]] - old[i][mask[i]]).mean())) for i in range(6)]
    assert m["policy/seq_ratio"].item() == pytest.approx(sum(seq) / 6, rel=1e-5)


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.28), (1.0, 4.0), (5.0, 0.1)])
def test_cispo_matches_the_reference_and_keeps_every_tokens_gradient(eps_low, eps_high):
    m, grad, (logps, old, mask) = against_reference(
        "cispo", "token_mean", ref_cispo, 2, 0.8, eps_low, eps_high
    )
    # the clip bounds the weight, but no counted token loses its gradient (unlike PPO's clip)
    assert bool((grad[mask] != 0).all())
    ratio = torch.exp(logps - old)[mask]
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).double().mean().item()
    assert m["policy/clipfrac"].item() == pytest.approx(clipped)


def test_cispo_refuses_dual_clip_and_unknown_losses_are_named():
    logps, old, adv, mask = inputs()
    with pytest.raises(ValueError, match="not with cispo"):
        policy_loss(logps, old, adv.unsqueeze(1), mask, kind="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss(logps, old, adv.unsqueeze(1), mask, kind="sapo")  # type: ignore[arg-type]


def test_gspo_and_cispo_on_all_masked_rows_are_zero_and_finite():
    logps, old, adv, mask = inputs()
    empty = torch.zeros_like(mask)
    for kind in ("gspo", "cispo", "ppo"):
        x = logps.clone().float().requires_grad_(True)
        loss, _ = policy_loss(x, old.float(), adv.float().unsqueeze(1), empty, kind=kind)
        loss.backward()
        assert loss.item() == 0.0 and bool((x.grad == 0).all())


# ------------------------------------------------------------------ against TRL's own loss


def trl_loss(loss_type, level, logps, old, adv, mask, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss (eval mode: no gradient-accumulation scaling) on our
    tensors: a stand-in `self` that hands it the log-probs instead of running a model."""
    # trl is in the dev extra (CI has it); an environment without it (the vLLM one) still
    # collects this file.
    from trl.trainer import grpo_trainer as trl_grpo

    ours = logps.clone().requires_grad_(True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (ours, torch.zeros_like(ours), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
        use_vllm=False,
        model=SimpleNamespace(training=False),
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        accelerator=SimpleNamespace(
            num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x
        ),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    B, T = logps.shape
    batch = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, batch)
    loss.backward()
    return loss, ours.grad


# (TRL loss_type, TRL importance level, TRL ε_low/ε_high) -> (our policy_loss, aggregation, ε_low/ε_high)
PAIRS = [
    (("grpo", "token", 0.2, 0.28), ("ppo", "seq_mean_token_mean", 0.2, 0.28)),
    (("bnpo", "token", 0.2, 0.2), ("ppo", "token_mean", 0.2, 0.2)),
    (("dapo", "token", 0.2, 0.28), ("ppo", "token_mean", 0.2, 0.28)),
    (("dr_grpo", "token", 0.2, 0.2), ("ppo", "seq_mean_token_sum_norm", 0.2, 0.2)),
    # GSPO in TRL: the sequence-level importance weight with the GRPO loss
    (("grpo", "sequence", 3e-4, 4e-4), ("gspo", "seq_mean_token_mean", 3e-4, 4e-4)),
    # TRL's CISPO truncates the ratio at ε_high itself and has no lower bound: ours with
    # ε_low = 1 (lower bound 0) and 1 + ε_high = TRL's ε_high
    (("cispo", "token", 0.2, 5.0), ("cispo", "token_mean", 1.0, 4.0)),
]


@pytest.mark.parametrize("trl_side, our_side", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_losses_match_trls_grpo_loss(trl_side, our_side, seed):
    loss_type, level, t_lo, t_hi = trl_side
    kind, aggregation, lo, hi = our_side
    logps, old, adv, mask = inputs(B=8, T=6, seed=seed, spread=0.5)
    logps, old, adv = logps.float(), old.float(), adv.float()
    want, want_grad = trl_loss(loss_type, level, logps, old, adv, mask, t_lo, t_hi, max_len=6)
    mine = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(
        mine,
        old,
        adv.unsqueeze(1) * mask,
        mask,
        kind=kind,
        clip_eps=lo,
        clip_eps_high=hi,
        aggregation=aggregation,
        norm_length=6,
    )
    loss.backward()
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.grad * mask, want_grad * mask, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ DAPO's overlong punishment


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([0, 10, 12, 13, 15, 16, 20])
    # max 16, buffer 4: free up to 12, then -(len - 12)/4, -1 from 16 on
    expected = [0.0, 0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 16, 4).tolist() == pytest.approx(expected)
    assert overlong_penalty(lengths, 16, 4, penalty=0.7).tolist() == pytest.approx(
        [0.7 * x for x in expected]
    )
    # buffer = max: the penalty starts at the first token
    assert overlong_penalty(torch.tensor([1, 5]), 10, 10).tolist() == pytest.approx([-0.1, -0.5])
    for bad in (0, 17):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty(lengths, 16, bad)


@pytest.mark.parametrize("kind", ["ppo", "gspo", "cispo"])
def test_a_group_of_identical_rewards_contributes_nothing(kind):
    """Rewards 0.7 (not exact in binary) for all 4 samples of a group: the GRPO advantage is
    exactly 0, so the group's loss and its gradient are exactly 0 whatever the ratios."""
    from rlhf.advantages import broadcast_to_tokens, grpo_advantages

    scores = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.1, 0.9, 0.3, 0.7])
    adv = grpo_advantages(scores, 4)
    assert adv[:4].tolist() == [0.0] * 4 and bool((adv[4:] != 0).all())
    logps, old, _, mask = inputs(B=8, T=5, seed=3, spread=0.6)
    x = logps.float().requires_grad_(True)
    loss, _ = policy_loss(
        x,
        old.float(),
        broadcast_to_tokens(adv, mask),
        mask,
        kind=kind,
        aggregation="seq_mean_token_sum",
    )
    loss.backward()
    assert bool((x.grad[:4] == 0).all()) and bool((x.grad[4:][mask[4:]] != 0).any())
