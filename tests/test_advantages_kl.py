"""Tests of the KL estimators/controllers and the advantage estimators against independent
float64 references (explicit sums, plain loops, numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf.advantages import (
    RunningMeanStd,
    broadcast_to_tokens,
    discounted_returns,
    explained_variance,
    gae,
    grpo_advantages,
    kl_shaped_rewards,
    last_token_index,
    reinforce_pp_advantages,
    rloo_advantages,
    shape_scores,
)
from rlhf.kl import AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller
from tests.tensors import F64, assert_close, gen, random_mask

torch.set_num_threads(1)


def lengths_of(mask: torch.Tensor) -> list[int]:
    return [int(v) for v in mask.sum(1).tolist()]


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def ref_kl(lp: float, ref: float, estimator: str) -> float:
    """Schulman, "Approximating KL divergence" (2020), with r = π_ref(x)/π(x), x ~ π:
    k1 = -log r, k2 = ½ (log r)², k3 = (r - 1) - log r."""
    log_r = ref - lp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    return math.expm1(log_r) - log_r


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_random_matches_reference(estimator):
    g = gen(1)
    lp = -torch.rand(3, 6, generator=g) * 5
    ref = lp + torch.randn(3, 6, generator=g)
    out = kl_estimate(lp, ref, estimator)
    assert out.shape == (3, 6) and out.dtype == torch.float32
    want = [
        [ref_kl(a, b, estimator) for a, b in zip(ra, rb, strict=True)]
        for ra, rb in zip(lp.double().tolist(), ref.double().tolist(), strict=True)
    ]
    assert_close(out, want, rtol=1e-5, atol=1e-6)
    if estimator != "k1":
        assert (out >= 0).all()


def test_kl_estimate_hand_values():
    # log π = -1, log π_ref = -2: log r = -1, r = e^-1 = 0.367879
    # k1 = 1, k2 = 0.5, k3 = 0.367879 - 1 + 1 = 0.367879
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert_close(kl_estimate(lp, ref, "k1"), [1.0])
    assert_close(kl_estimate(lp, ref, "k2"), [0.5])
    assert_close(kl_estimate(lp, ref, "k3"), [math.exp(-1)])
    # identical policies: every estimator is exactly 0
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(ref, ref, est), torch.zeros(1))


def test_kl_estimators_k1_k3_unbiased_monte_carlo():
    # sample x ~ π and compare E[k] with the exact KL(π || π_ref) = Σ π log(π/π_ref)
    g = gen(2)
    logits_p = torch.randn(6, generator=g, dtype=F64) * 0.5
    logits_q = logits_p + torch.randn(6, generator=g, dtype=F64) * 0.3
    logp, logq = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    exact = sum(math.exp(a) * (a - b) for a, b in zip(logp.tolist(), logq.tolist(), strict=True))
    x = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k1 = kl_estimate(logp[x].float(), logq[x].float(), "k1").double()
    k3 = kl_estimate(logp[x].float(), logq[x].float(), "k3").double()
    assert k1.mean().item() == pytest.approx(exact, abs=4 * k1.std().item() / math.sqrt(x.numel()))
    assert k3.mean().item() == pytest.approx(exact, abs=4 * k3.std().item() / math.sqrt(x.numel()))
    # k3 is the low-variance one for nearby distributions
    assert k3.var().item() < k1.var().item()


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_kl_estimate_huge_gap_finite(gap):
    lp = torch.tensor([gap, 0.0], requires_grad=True)
    ref = torch.zeros(2)
    for est in ("k1", "k2", "k3"):
        lp.grad = None
        out = kl_estimate(lp, ref, est)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(lp.grad).all()
    # k3 clamps |log r| at 20: log r = -gap -> ±20: e^{±20} - 1 ∓ 20
    lr = max(min(-gap, 20.0), -20.0)
    assert_close(kl_estimate(lp, ref, "k3")[0], math.expm1(lr) - lr, rtol=1e-6)


def test_kl_estimate_bf16_and_invalid():
    g = gen(3)
    lp = -torch.rand(10, generator=g) * 4
    ref = lp + torch.randn(10, generator=g) * 0.5
    for est in ("k1", "k2", "k3"):
        out16 = kl_estimate(lp.bfloat16(), ref.bfloat16(), est)
        assert out16.dtype == torch.float32
        assert_close(out16, kl_estimate(lp, ref, est), rtol=0, atol=3e-2)
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_fixed_controller_and_round_trip():
    c = FixedKLController(0.05)
    assert c.update(100.0, 512) == 0.05 and c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05
    assert isinstance(make_kl_controller(0.05, None, 100), FixedKLController)
    assert isinstance(make_kl_controller(0.05, 6.0, 100), AdaptiveKLController)


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        # Ziegler et al. 2019: e = clip(KL/target - 1, ±0.2), β ← β (1 + e · n/horizon);
        # β = 0.1, target 6, n = 256, horizon 10000 (K = 0.0256):
        (9.0, 0.1 * (1 + 0.2 * 0.0256)),  # e = 0.5 clipped to 0.2 -> 0.100512
        (6.6, 0.1 * (1 + 0.1 * 0.0256)),  # e = 0.1 -> 0.100256
        (6.0, 0.1),  # on target: unchanged
        (5.4, 0.1 * (1 - 0.1 * 0.0256)),  # e = -0.1 -> 0.099744
        (0.0, 0.1 * (1 - 0.2 * 0.0256)),  # e = -1 clipped to -0.2 -> 0.099488
    ],
)
def test_adaptive_controller_hand_values(kl, expected):
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(kl, 256) == pytest.approx(expected, rel=1e-12)
    assert c.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_controller_direction_and_clip():
    up = AdaptiveKLController(1.0, target=1.0, horizon=100)
    down = AdaptiveKLController(1.0, target=1.0, horizon=100)
    prev_up, prev_down = 1.0, 1.0
    for _ in range(5):
        assert up.update(1.5, 10) > prev_up  # KL above target -> β grows
        assert down.update(0.5, 10) < prev_down  # KL below target -> β shrinks
        prev_up, prev_down = up.value, down.value
    # per step the factor is at most 1 ± 0.2 · n/horizon, however far the KL is from target
    far = AdaptiveKLController(1.0, target=1.0, horizon=100)
    assert far.update(1e6, 100) == pytest.approx(1.2)
    assert far.update(0.0, 100) == pytest.approx(1.2 * 0.8)


def test_adaptive_controller_state_round_trip_and_invalid():
    a = AdaptiveKLController(0.2, target=3.0, horizon=500)
    for kl in (1.0, 5.0, 2.5):
        a.update(kl, 64)
    b = AdaptiveKLController(9.9, target=1.0, horizon=1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for kl in (4.0, 0.1, 3.3):
        assert b.update(kl, 32) == a.update(kl, 32)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


# ---------------------------------------------------------------------------------------------
# kl_shaped_rewards
# ---------------------------------------------------------------------------------------------


def ref_kl_shaped(scores, lp, ref, mask, beta, estimator):
    """Ziegler et al. 2019 eq. 2 / Stiennon et al. 2020 eq. 1 per token: r_t = -β KL_t, plus the
    sequence score on the last response token; zero outside the response."""
    rewards, kls = [], []
    n = lengths_of(mask)
    for b, (lr, rr) in enumerate(zip(lp.double().tolist(), ref.double().tolist(), strict=True)):
        krow = [
            ref_kl(a, c, estimator) if t < n[b] else 0.0
            for t, (a, c) in enumerate(zip(lr, rr, strict=True))
        ]
        rrow = [-beta * k for k in krow]
        if n[b] > 0:
            rrow[n[b] - 1] += float(scores[b])
        rewards.append(rrow)
        kls.append(krow)
    return rewards, kls


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_shaped_rewards_matches_reference(estimator):
    g = gen(4)
    B, T = 5, 6
    lp = -torch.rand(B, T, generator=g) * 4
    ref = lp + torch.randn(B, T, generator=g) * 0.5
    scores = torch.randn(B, generator=g)
    mask = random_mask(B, T, g)
    mask[2] = False  # empty response: no score, no KL
    rewards, kl = kl_shaped_rewards(scores, lp, ref, mask, 0.05, estimator)
    want_r, want_k = ref_kl_shaped(scores, lp, ref, mask, 0.05, estimator)
    assert_close(rewards, want_r)
    assert_close(kl, want_k)
    assert torch.equal(rewards[2], torch.zeros(T))


def test_kl_shaped_rewards_hand_values_and_last_token_index():
    # row 0 (3 tokens), k1 = [1, 0, -1], β = 0.5, score 2 -> [-0.5, 0, 0.5 + 2, 0]
    lp = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0, -2.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, 0.5)
    assert_close(rewards, [[-0.5, 0.0, 2.5, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    assert_close(kl, [[1.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert last_token_index(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])).tolist() == [1, -1, 2]
    assert_close(
        broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), [[2, 2, 2, 0], [-1, 0, 0, 0]]
    )


# ---------------------------------------------------------------------------------------------
# GAE / discounted returns
# ---------------------------------------------------------------------------------------------


def ref_gae(rewards, values, mask, gamma, lam):
    """GAE, Schulman et al. 2016, eq. 16, as the explicit sum A_t = Σ_l (γλ)^l δ_{t+l},
    δ_t = r_t + γ V_{t+1} - V_t, with V = 0 past the end of the response (eq. 11)."""
    R, V = rewards.double().tolist(), values.double().tolist()
    adv, ret = [], []
    for b, n in enumerate(lengths_of(mask)):
        T = len(R[b])
        delta = [R[b][t] + gamma * (V[b][t + 1] if t + 1 < n else 0.0) - V[b][t] for t in range(n)]
        arow = [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]
        adv.append(arow + [0.0] * (T - n))
        ret.append([a + V[b][t] for t, a in enumerate(arow)] + [0.0] * (T - n))
    return adv, ret


def gae_inputs(B: int, T: int, seed: int):
    g = gen(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = random_mask(B, T, g)
    mask[1] = False
    # garbage outside the response must not leak in
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e3))
    values = torch.where(mask, values, torch.full_like(values, -1e3))
    return rewards, values, mask


@pytest.mark.parametrize(
    ("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.8, 1.0), (1.0, 1.0)]
)
def test_gae_matches_explicit_sum(gamma, lam):
    rewards, values, mask = gae_inputs(5, 7, seed=5)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_a, want_r = ref_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32
    assert_close(adv, want_a, rtol=1e-5, atol=1e-5)
    assert_close(ret, want_r, rtol=1e-5, atol=1e-5)
    # the empty response and every masked position are exactly 0
    assert torch.equal(adv[1], torch.zeros(7)) and torch.equal(ret[1], torch.zeros(7))
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask = gae_inputs(4, 6, seed=6)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    R, V = rewards.double().tolist(), values.double().tolist()
    for b, n in enumerate(lengths_of(mask)):
        for t in range(n):
            togo = sum(R[b][t:n])
            assert adv[b, t].item() == pytest.approx(togo - V[b][t], abs=1e-5)
            assert ret[b, t].item() == pytest.approx(togo, abs=1e-5)


def test_gae_lambda_zero_is_td_error_and_hand_values():
    # r = [0, 0, 1], V = [0.5, 0.5, 0.5], γ = 0.9:
    # λ = 0: δ = [0 + 0.45 - 0.5, 0 + 0.45 - 0.5, 1 + 0 - 0.5] = [-0.05, -0.05, 0.5]
    # λ = 1: A_2 = 0.5, A_1 = -0.05 + 0.9·0.5 = 0.4, A_0 = -0.05 + 0.9·0.4 = 0.31
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    m = torch.ones(1, 3, dtype=torch.bool)
    assert_close(gae(r, v, m, 0.9, 0.0)[0], [[-0.05, -0.05, 0.5]])
    adv, ret = gae(r, v, m, 0.9, 1.0)
    assert_close(adv, [[0.31, 0.4, 0.5]])
    assert_close(ret, [[0.81, 0.9, 1.0]])  # = discounted return 0.9², 0.9, 1
    # a single-token response: A = r - V
    adv, _ = gae(
        torch.tensor([[2.0, 5.0]]), torch.tensor([[0.5, 9.0]]), torch.tensor([[1, 0]]), 0.9, 0.95
    )
    assert_close(adv, [[1.5, 0.0]])


def test_gae_bf16_inputs():
    rewards, values, mask = gae_inputs(3, 5, seed=7)
    adv16, _ = gae(rewards.bfloat16(), values.bfloat16(), mask, 0.99, 0.95)
    assert adv16.dtype == torch.float32
    want, _ = ref_gae(rewards.bfloat16(), values.bfloat16(), mask, 0.99, 0.95)
    assert_close(adv16, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_matches_reference(gamma):
    rewards, _, mask = gae_inputs(4, 6, seed=8)
    out = discounted_returns(rewards, mask, gamma)
    R = rewards.double().tolist()
    # G_t = Σ_{k=t}^{n-1} γ^{k-t} r_k
    want = [
        [sum(gamma ** (k - t) * R[b][k] for k in range(t, n)) if t < n else 0.0 for t in range(6)]
        for b, n in enumerate(lengths_of(mask))
    ]
    assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GRPO / RLOO
# ---------------------------------------------------------------------------------------------


def ref_grpo(scores, G, scale, eps=1e-4):
    """GRPO, Shao et al. 2024, §4.1.2: Â_i = (r_i - mean(r)) / std(r) within each group
    (unbiased sample std, + eps); "batch" divides by the std of all scores instead, "none"
    (Dr. GRPO) only centres. A group of equal scores carries no signal: 0."""
    s = scores.double().tolist()
    n = len(s)
    mu_all = sum(s) / n
    sd_all = math.sqrt(sum((v - mu_all) ** 2 for v in s) / (n - 1)) if n > 1 else 0.0
    out = []
    for i in range(0, n, G):
        grp = s[i : i + G]
        mu = sum(grp) / G
        sd = math.sqrt(sum((v - mu) ** 2 for v in grp) / (G - 1)) if G > 1 else 0.0
        div = {"group": sd + eps if G > 1 else 1.0, "batch": sd_all + eps, "none": 1.0}[scale]
        out += [0.0 if max(grp) == min(grp) else (v - mu) / div for v in grp]
    return out


def ref_rloo(scores, G):
    """RLOO, Ahmadian et al. 2024, eq. 6: r_i - 1/(G-1) Σ_{j≠i} r_j."""
    s = scores.double().tolist()
    out = []
    for i in range(0, len(s), G):
        grp = s[i : i + G]
        out += [
            v - sum(w for j, w in enumerate(grp) if j != k) / (G - 1) for k, v in enumerate(grp)
        ]
    return out


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_reference(G, scale):
    scores = torch.randn(16, generator=gen(9)) * 2 + 1
    out = grpo_advantages(scores, G, scale=scale)
    assert out.shape == (16,) and out.dtype == torch.float32
    assert_close(out, ref_grpo(scores, G, scale), rtol=1e-5, atol=1e-5)


def test_grpo_hand_values_and_degenerate_groups():
    # [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.5625 + 3·0.0625)/3) = 0.5 -> [1.5, -0.5, -0.5, -0.5]
    # (/ 0.5001 with TRL's eps 1e-4)
    assert_close(
        grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4),
        [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001],
        atol=1e-6,
    )
    # identical scores in a group: all zeros, no NaN; a single sample: 0
    out = grpo_advantages(torch.tensor([3.0, 3.0, 3.0, -1.0, 2.0, 2.0]), 3)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:3], torch.zeros(3))
    assert torch.equal(grpo_advantages(torch.tensor([5.0, -2.0]), 1), torch.zeros(2))
    assert grpo_advantages(torch.tensor([1.0, 2.0]).bfloat16(), 2).dtype == torch.float32


@pytest.mark.parametrize("value", [0.7, 0.1, 1 / 3, 1e-8, -2.3, 1e6 + 0.1])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unanimous_groups_get_exactly_zero(value, scale):
    """Eight equal rewards that are not exact in binary: a float32 mean is off by an ulp, and
    divided by std + eps that became +0.056 for every sample of a 0.7 group (and, whitened,
    ±0.99). Every sample of such a group gets exactly 0, from GRPO, RLOO and the
    REINFORCE++ baseline; the mixed group beside it is untouched."""
    scores = torch.tensor([value] * 8 + [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    out = grpo_advantages(scores, 8, scale=scale)
    assert torch.equal(out[:8], torch.zeros(8)), out[:8]
    assert_close(out[8:], ref_grpo(scores, 8, scale)[8:], rtol=1e-6, atol=1e-6)
    assert torch.equal(rloo_advantages(scores, 8)[:8], torch.zeros(8))


@pytest.mark.parametrize("G", [0, 3, 5])
def test_grpo_indivisible_groups_raise(G):
    with pytest.raises(ValueError):
        grpo_advantages(torch.randn(8, generator=gen(10)), G)


@pytest.mark.parametrize("G", [2, 4])
def test_rloo_matches_reference(G):
    scores = torch.randn(12, generator=gen(11)) * 3
    out = rloo_advantages(scores, G)
    assert_close(out, ref_rloo(scores, G), rtol=1e-5, atol=1e-5)
    # identity: leave-one-out baseline = G/(G-1) × (r - group mean)
    assert_close(
        out, [G / (G - 1) * v for v in ref_grpo(scores, G, scale="none")], rtol=1e-5, atol=1e-5
    )


def test_rloo_hand_values_and_invalid():
    # [1, 0, 0, 0]: [1 - 0, 0 - 1/3, 0 - 1/3, 0 - 1/3]
    assert_close(
        rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4), [1.0, -1 / 3, -1 / 3, -1 / 3]
    )
    with pytest.raises(ValueError):
        rloo_advantages(torch.randn(4, generator=gen(12)), 1)
    with pytest.raises(ValueError):
        rloo_advantages(torch.randn(6, generator=gen(13)), 4)


# ---------------------------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------------------------


def ref_reinforce_pp(scores, lp, ref, mask, beta, G, gamma, estimator):
    """REINFORCE++, Hu 2025, §3: per-token rewards r_t = -β KL_t (+ score at the last token),
    returns G_t = Σ_{k>=t} γ^{k-t} r_k, then whitening over all response tokens of the batch
    (unbiased variance, + 1e-8). With G > 1 the score is first centred on its group's mean
    (REINFORCE++-baseline)."""
    s = scores.double().tolist()
    if G > 1:
        s = [v - sum(s[i - i % G : i - i % G + G]) / G for i, v in enumerate(s)]
    rewards, _ = ref_kl_shaped(s, lp, ref, mask, beta, estimator)
    n = lengths_of(mask)
    T = len(rewards[0])
    returns = [
        [
            sum(gamma ** (k - t) * rewards[b][k] for k in range(t, n[b])) if t < n[b] else 0.0
            for t in range(T)
        ]
        for b in range(len(n))
    ]
    counted = [returns[b][t] for b in range(len(n)) for t in range(n[b])]
    mu = sum(counted) / len(counted)
    var = sum((v - mu) ** 2 for v in counted) / (len(counted) - 1)
    return [
        [(returns[b][t] - mu) / math.sqrt(var + 1e-8) if t < n[b] else 0.0 for t in range(T)]
        for b in range(len(n))
    ]


@pytest.mark.parametrize(
    ("G", "gamma", "estimator"), [(1, 1.0, "k1"), (4, 1.0, "k3"), (2, 0.9, "k1")]
)
def test_reinforce_pp_matches_reference(G, gamma, estimator):
    g = gen(14)
    B, T = 8, 6
    lp = -torch.rand(B, T, generator=g) * 3
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    scores = torch.randn(B, generator=g)
    mask = random_mask(B, T, g)
    mask[5] = False
    out = reinforce_pp_advantages(scores, lp, ref, mask, 0.1, G, gamma, estimator)
    assert_close(
        out, ref_reinforce_pp(scores, lp, ref, mask, 0.1, G, gamma, estimator), rtol=1e-4, atol=1e-4
    )
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum())))
    counted = out[mask].double()
    assert abs(counted.mean().item()) < 1e-5 and abs(counted.std().item() - 1) < 1e-4


# ---------------------------------------------------------------------------------------------
# RunningMeanStd / shape_scores / explained_variance
# ---------------------------------------------------------------------------------------------


def test_running_mean_std_matches_numpy_over_all_data():
    g = gen(15)
    rms = RunningMeanStd()
    seen: list[np.ndarray] = []
    for size, loc, scale in [
        (7, 0.0, 1.0),
        (1, 5.0, 1.0),
        (50, -2.0, 3.0),
        (3, 10.0, 0.1),
        (0, 0.0, 1.0),
    ]:
        batch = torch.randn(size, generator=g) * scale + loc
        rms.update(batch)
        seen.append(batch.double().numpy())
        data = np.concatenate(seen)
        if data.size:
            assert rms.count == data.size
            assert rms.mean == pytest.approx(float(np.mean(data)), rel=1e-12, abs=1e-12)
            assert rms.var == pytest.approx(float(np.var(data)), rel=1e-10)
            assert rms.std == pytest.approx(float(np.std(data)), rel=1e-10)
    # an empty batch changes nothing; the state round-trips
    state = rms.state_dict()
    other = RunningMeanStd()
    other.load_state_dict(state)
    assert other.state_dict() == state
    more = torch.randn(9, generator=g)
    rms.update(more)
    other.update(more)
    assert other.state_dict() == rms.state_dict()


def test_running_mean_std_initial_state_and_2d_input():
    rms = RunningMeanStd()
    assert (rms.mean, rms.var, rms.count) == (0.0, 1.0, 0)
    rms.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # mean 2.5, population variance 1.25
    assert (rms.mean, rms.var, rms.count) == (2.5, 1.25, 4)


def ref_shape_scores(scores, baseline, mean_var, clip, has_eos, penalty, eps=1e-8):
    """Penalty for a missing EOS, baseline subtraction, normalisation by running stats
    (mean, var), then clipping, in that order."""
    out = []
    for i, s in enumerate(scores):
        if penalty is not None and has_eos is not None and not has_eos[i]:
            s -= penalty
        s -= baseline
        if mean_var is not None:
            s = (s - mean_var[0]) / (math.sqrt(mean_var[1]) + eps)
        if clip is not None:
            s = min(max(s, -clip), clip)
        out.append(s)
    return out


def test_shape_scores_matches_reference():
    g = gen(16)
    scores = torch.randn(10, generator=g) * 3
    has_eos = torch.rand(10, generator=g) < 0.7
    s = scores.double().tolist()
    # the normaliser sees the penalised, baseline-shifted batch first
    pre = [v - (1.5 if not e else 0.0) - 0.3 for v, e in zip(s, has_eos.tolist(), strict=True)]
    prior = [0.5, -1.0, 2.0]
    stats = np.concatenate([prior, pre])
    rms = RunningMeanStd()
    rms.update(torch.tensor(prior))
    out = shape_scores(
        scores, baseline=0.3, normalizer=rms, clip=1.2, has_eos=has_eos, missing_eos_penalty=1.5
    )
    want = ref_shape_scores(
        s, 0.3, (float(stats.mean()), float(stats.var())), 1.2, has_eos.tolist(), 1.5
    )
    assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert rms.count == 13
    assert out.abs().max().item() <= 1.2 + 1e-6


def test_shape_scores_hand_values_and_identity():
    # scores [3, -4], no EOS on the first: penalty 1 -> [2, -4]; baseline 0.5 -> [1.5, -4.5];
    # clip 2 -> [1.5, -2]
    out = shape_scores(
        torch.tensor([3.0, -4.0]),
        baseline=0.5,
        clip=2.0,
        has_eos=torch.tensor([False, True]),
        missing_eos_penalty=1.0,
    )
    assert_close(out, [1.5, -2.0])
    x = torch.randn(5, generator=gen(17))
    assert torch.equal(shape_scores(x), x)
    assert shape_scores(x.bfloat16()).dtype == torch.float32


def ref_explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the counted tokens (population variances)."""
    m = mask.numpy().astype(bool)
    R, V = returns.double().numpy()[m], values.double().numpy()[m]
    return 1 - np.var(R - V) / max(np.var(R), 1e-8)


def test_explained_variance_matches_reference_and_extremes():
    g = gen(18)
    returns = torch.randn(4, 6, generator=g) * 2
    values = returns + torch.randn(4, 6, generator=g) * 0.5
    mask = random_mask(4, 6, g)
    mask[0] = False
    values = torch.where(mask, values, torch.full_like(values, 1e4))
    assert_close(
        explained_variance(values, returns, mask),
        ref_explained_variance(values, returns, mask),
        rtol=1e-5,
    )
    # small-scale returns (Var[R] ~ 1e-6) are not swamped by the denominator's floor
    small = returns * 1e-3
    assert_close(
        explained_variance(small + (values - returns) * 1e-3, small, mask),
        ref_explained_variance(values, returns, mask),
        rtol=1e-4,
    )
    # perfect critic: 1; constant critic: 0 (shifting V by a constant does not explain variance)
    assert_close(explained_variance(returns, returns, mask), 1.0)
    assert_close(explained_variance(torch.full_like(returns, 3.0), returns, mask), 0.0, atol=1e-5)
    # hand: R = [1, 2, 3], V = [1, 1, 1]: Var[R] = 2/3, Var[R - V] = Var[0, 1, 2] = 2/3 -> 0
    # V = [1, 2, 2]: R - V = [0, 0, 1], Var = 2/9 -> 1 - (2/9)/(2/3) = 2/3
    R = torch.tensor([[1.0, 2.0, 3.0]])
    full = torch.ones(1, 3, dtype=torch.bool)
    assert_close(explained_variance(torch.ones(1, 3), R, full), 0.0, atol=1e-6)
    assert_close(explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), R, full), 2 / 3)
    # nothing counted: finite
    assert torch.isfinite(explained_variance(values, returns, torch.zeros(4, 6, dtype=torch.bool)))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_steps_over_the_environments_tokens(gamma, lam):
    """A multi-turn response [turn 1, environment ids, turn 2]: GAE over it equals GAE over
    the model's tokens alone (the environment's ids removed), and is 0 on the gap, so the
    final reward reaches the first turn."""
    g = gen(11)
    rewards, values = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool
    )
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e3))  # garbage in the gaps
    values = torch.where(mask, values, torch.full_like(values, -1e3))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(2):
        keep = mask[b]
        n = int(keep.sum())
        a, r = gae(rewards[b][keep][None], values[b][keep][None], torch.ones(1, n), gamma, lam)
        assert_close(adv[b][keep], a[0].tolist(), rtol=1e-6, atol=1e-6)
        assert_close(ret[b][keep], r[0].tolist(), rtol=1e-6, atol=1e-6)
        assert torch.equal(adv[b][~keep], torch.zeros(int((~keep).sum())))
    # by hand: rewards [0, gap, 1], V = 0, γ = 0.9, λ = 1: A = [0.9, 0, 1]
    r = torch.tensor([[0.0, 5.0, 1.0]])
    m = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    assert_close(gae(r, torch.zeros(1, 3), m, 0.9, 1.0)[0], [[0.9, 0.0, 1.0]])
    assert_close(discounted_returns(r, m, 0.9), [[0.9, 0.0, 1.0]])
