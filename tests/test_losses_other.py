"""Tests of the PPO, reward-model and SFT losses against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses.ppo import (
    entropy_loss,
    kl_penalty_loss,
    off_policy_weights,
    policy_loss,
    value_loss,
)
from rlhf.losses.reward import bradley_terry_loss, classification_loss
from rlhf.losses.sft import sft_loss
from tests.tensors import F64, assert_close, gen, random_mask

torch.set_num_threads(1)

MODES = ["token_mean", "seq_mean", "seq_mean_token_sum"]


# ---------------------------------------------------------------------------------------------
# Independent references (float64, plain Python)
# ---------------------------------------------------------------------------------------------


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(log_sigmoid(z))


def ref_aggregate(per_token: list[list[float]], mask: list[list[bool]], mode: str) -> float:
    """token_mean over all counted tokens; seq_mean / seq_mean_token_sum over non-empty rows."""
    rows = [
        [v for v, m in zip(pr, mr, strict=True) if m]
        for pr, mr in zip(per_token, mask, strict=True)
    ]
    flat = [v for r in rows for v in r]
    if mode == "token_mean":
        return sum(flat) / len(flat) if flat else 0.0
    nonempty = [r for r in rows if r]
    if not nonempty:
        return 0.0
    per_seq = [sum(r) / len(r) if mode == "seq_mean" else sum(r) for r in nonempty]
    return sum(per_seq) / len(per_seq)


def ref_masked_mean(per_token: list[list[float]], mask: list[list[bool]]) -> float:
    return ref_aggregate(per_token, mask, "token_mean")


def ref_policy(logps, old, adv, mask, eps_low, eps_high, dual_clip, mode):
    """PPO clipped surrogate, Schulman et al. 2017, eq. 7, as a loss to minimise:
    ℓ = max(-A ρ, -A clip(ρ, 1-ε_low, 1+ε_high)), ρ = exp(log π - log π_old);
    dual clip (Ye et al. 2020, eq. 5): for A < 0, ℓ = min(ℓ, -c A)."""
    L, Old, A, M = (t.double().tolist() for t in (logps, old, adv, mask))
    per_tok, clipped_ind, dual_ind, kl, ratios = [], [], [], [], []
    for lr, orow, ar in zip(L, Old, A, strict=True):
        pr, cr, dr, kr, rr = [], [], [], [], []
        for lp, ol, a in zip(lr, orow, ar, strict=True):
            lratio = min(max(lp - ol, -20.0), 20.0)
            rho = math.exp(lratio)
            unclipped = -a * rho
            clipped = -a * min(max(rho, 1 - eps_low), 1 + eps_high)
            v = max(unclipped, clipped)
            d = 0.0
            if dual_clip is not None and a < 0:
                d = 1.0 if v > -dual_clip * a else 0.0
                v = min(v, -dual_clip * a)
            pr.append(v)
            cr.append(1.0 if clipped > unclipped else 0.0)
            dr.append(d)
            kr.append(0.5 * lratio**2)
            rr.append(rho)
        per_tok.append(pr)
        clipped_ind.append(cr)
        dual_ind.append(dr)
        kl.append(kr)
        ratios.append(rr)
    metrics = {
        "policy/clipfrac": ref_masked_mean(clipped_ind, M),
        "policy/approx_kl": ref_masked_mean(kl, M),
        "policy/ratio": ref_masked_mean(ratios, M),
    }
    if dual_clip is not None:
        metrics["policy/dual_clipfrac"] = ref_masked_mean(dual_ind, M)
    loss = ref_aggregate(per_tok, M, mode)
    metrics["policy/loss"] = loss
    return loss, metrics


def ref_value(values, old, returns, mask, clip_range, mode):
    """Clipped value loss (PPO2 baseline; Huang et al. 2022 detail #9):
    ½ max((V - R)², (V_old + clip(V - V_old, ±c) - R)²); plain ½ (V - R)² when c is None."""
    V, Old, R, M = (t.double().tolist() for t in (values, old, returns, mask))
    per_tok, clipped_ind = [], []
    for vr, orow, rr in zip(V, Old, R, strict=True):
        pr, cr = [], []
        for v, o, ret in zip(vr, orow, rr, strict=True):
            u = (v - ret) ** 2
            if clip_range is None:
                pr.append(u)
                continue
            vc = o + min(max(v - o, -clip_range), clip_range)
            c = (vc - ret) ** 2
            pr.append(max(u, c))
            cr.append(1.0 if c > u else 0.0)
        per_tok.append(pr)
        clipped_ind.append(cr)
    loss = 0.5 * ref_aggregate(per_tok, M, mode)
    metrics = {"value/loss": loss, "value/mean": ref_masked_mean(V, M)}
    if clip_range is not None:
        metrics["value/clipfrac"] = ref_masked_mean(clipped_ind, M)
    return loss, metrics


def ppo_inputs(B: int, T: int, seed: int, spread: float = 0.4):
    g = gen(seed)
    old = -torch.rand(B, T, generator=g) * 5
    logps = old + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, T, generator=g)
    mask = random_mask(B, T, g)
    mask[1] = False  # an empty response
    return logps, old, adv, mask


# ---------------------------------------------------------------------------------------------
# policy_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("eps", "eps_high", "dual"), [(0.2, None, None), (0.2, 0.28, None), (0.1, None, 3.0)]
)
def test_policy_loss_random_matches_reference(mode, eps, eps_high, dual):
    logps, old, adv, mask = ppo_inputs(5, 7, seed=1)
    loss, m = policy_loss(
        logps,
        old,
        adv,
        mask,
        clip_eps=eps,
        clip_eps_high=eps_high,
        dual_clip=dual,
        aggregation=mode,
    )
    want, want_m = ref_policy(
        logps, old, adv, mask, eps, eps if eps_high is None else eps_high, dual, mode
    )
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, want)
    assert set(m) == set(want_m)
    for key, value in want_m.items():
        assert_close(m[key], value)
    assert 0 < m["policy/clipfrac"].item() < 1  # the inputs do exercise both branches


@pytest.mark.parametrize(
    ("ratio", "adv", "dual", "expected", "clipped", "dual_hit"),
    [
        # A = 1, ρ = 1.5: max(-1.5, -1.2) = -1.2, clipped
        (1.5, 1.0, None, -1.2, 1.0, None),
        # A = 1, ρ = 1.1 (inside the trust region): -1.1, not clipped
        (1.1, 1.0, None, -1.1, 0.0, None),
        # A = -1, ρ = 0.5: max(0.5, 0.8) = 0.8, clipped
        (0.5, -1.0, None, 0.8, 1.0, None),
        # A = -1, ρ = 5: max(5, 1.2) = 5 (unclipped: the pessimistic bound keeps the large ratio)
        (5.0, -1.0, None, 5.0, 0.0, None),
        # ... dual clip c = 3 bounds it at -c A = 3
        (5.0, -1.0, 3.0, 3.0, 0.0, 1.0),
        # dual clip does not touch ρ = 2 (loss 2 < 3) nor positive advantages
        (2.0, -1.0, 3.0, 2.0, 0.0, 0.0),
        (5.0, 1.0, 3.0, -1.2, 1.0, 0.0),
    ],
)
def test_policy_loss_hand_values(ratio, adv, dual, expected, clipped, dual_hit):
    old = torch.tensor([[-2.0]])
    logps = old + math.log(ratio)
    loss, m = policy_loss(
        logps, old, torch.tensor([[adv]]), torch.ones(1, 1, dtype=torch.bool), dual_clip=dual
    )
    assert_close(loss, expected)
    assert_close(m["policy/clipfrac"], clipped)
    assert_close(m["policy/ratio"], ratio)
    assert_close(m["policy/approx_kl"], 0.5 * math.log(ratio) ** 2)
    if dual_hit is not None:
        assert_close(m["policy/dual_clipfrac"], dual_hit)


def test_policy_loss_gradient_matches_analytic():
    # unclipped token: dℓ/d log π = -A ρ; clipped (or dual-clipped) token: 0; token_mean adds 1/N
    logps, old, adv, mask = ppo_inputs(4, 6, seed=2, spread=0.3)
    logps.requires_grad_()
    loss, _ = policy_loss(logps, old, adv, mask, clip_eps=0.2, dual_clip=2.0)
    loss.backward()
    M = mask.tolist()
    n = sum(sum(r) for r in M)
    expected = []
    for lr, orow, ar, mr in zip(logps.tolist(), old.tolist(), adv.tolist(), M, strict=True):
        row = []
        for lp, ol, a, m in zip(lr, orow, ar, mr, strict=True):
            rho = math.exp(lp - ol)
            unclipped, clipped = -a * rho, -a * min(max(rho, 0.8), 1.2)
            active_unclipped = unclipped >= clipped and not (a < 0 and unclipped > -2.0 * a)
            row.append(-a * rho / n if (m and active_unclipped) else 0.0)
        expected.append(row)
    assert_close(logps.grad, expected, rtol=1e-5, atol=1e-7)
    assert logps.grad[1].abs().sum() == 0  # the empty response gets no gradient


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_fully_masked_is_zero(mode):
    logps, old, adv, _ = ppo_inputs(3, 4, seed=3)
    logps = logps.requires_grad_()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss, m = policy_loss(logps, old, adv, mask, aggregation=mode, dual_clip=2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in m.values())
    assert torch.equal(logps.grad, torch.zeros(3, 4))


def test_policy_loss_masked_garbage_and_single_token():
    logps, old, adv, mask = ppo_inputs(4, 5, seed=4)
    want, _ = ref_policy(logps, old, adv, mask, 0.2, 0.2, None, "token_mean")
    # garbage outside the mask (huge log-prob gaps, huge advantages) changes nothing
    garbage_lp = torch.where(mask, logps, torch.full_like(logps, 1e4))
    garbage_adv = torch.where(mask, adv, torch.full_like(adv, -1e6))
    assert_close(policy_loss(garbage_lp, old, garbage_adv, mask)[0], want)
    one = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.bool)
    loss, _ = policy_loss(logps[:1, :3], old[:1, :3], adv[:1, :3], one, aggregation="seq_mean")
    want, _ = ref_policy(
        logps[:1, :1], old[:1, :1], adv[:1, :1], one[:, :1], 0.2, 0.2, None, "seq_mean"
    )
    assert_close(loss, want)


# ---------------------------------------------------------------------------------------------
# off-policy correction (truncated / masked importance sampling)
# ---------------------------------------------------------------------------------------------


def ref_correction(old, behaviour, mask, mode, cap):
    """w = π_old / π_b per token; tis: min(w, C) on every response token; mis: tokens with
    w outside [1/C, C] leave the loss (weight 1 for the rest)."""
    Old, B, M = (t.double().tolist() for t in (old, behaviour, mask))
    weights, keep, ws, hits = [], [], [], []
    for orow, brow, mrow in zip(Old, B, M, strict=True):
        wr, kr = [], []
        for o, b, m in zip(orow, brow, mrow, strict=True):
            w = math.exp(min(max(o - b, -20.0), 20.0))
            if m:
                ws.append(w)
            if mode == "tis":
                wr.append(min(w, cap))
                kr.append(bool(m))
                hits.append(m and w > cap)
            else:
                inside = 1.0 / cap <= w <= cap
                wr.append(1.0)
                kr.append(bool(m) and inside)
                hits.append(m and not inside)
        weights.append(wr)
        keep.append(kr)
    n = sum(1 for row in M for m in row if m)
    frac = sum(hits) / n if n else 0.0
    key = "rollout/is_capped_frac" if mode == "tis" else "rollout/is_masked_frac"
    metrics = {
        "rollout/is_weight_mean": sum(ws) / n if n else 0.0,
        "rollout/is_weight_max": max(ws) if ws else 0.0,
        key: frac,
    }
    return weights, keep, metrics


def test_off_policy_weights_by_hand():
    # w = π_old / π_b = 0.1, 0.7, 1.0, 2.5 on the response, 9.0 on a padded token (ignored).
    w = torch.tensor([[0.1, 0.7, 1.0, 2.5, 9.0]], dtype=torch.float64)
    behaviour = torch.tensor([[-1.3, -0.2, -2.0, -0.9, -0.5]], dtype=torch.float64)
    old = (behaviour + w.log()).float()
    mask = torch.tensor([[True, True, True, True, False]])
    weights, keep, m = off_policy_weights(old, behaviour.float(), mask, mode="tis", cap=2.0)
    assert_close(weights[0, :4], torch.tensor([0.1, 0.7, 1.0, 2.0]), rtol=1e-6)
    assert torch.equal(keep, mask)
    assert_close(m["rollout/is_weight_mean"], (0.1 + 0.7 + 1.0 + 2.5) / 4, rtol=1e-6)
    assert_close(m["rollout/is_weight_max"], 2.5, rtol=1e-6)
    assert m["rollout/is_capped_frac"].item() == 0.25
    weights, keep, m = off_policy_weights(old, behaviour.float(), mask, mode="mis", cap=2.0)
    assert weights is None
    # 0.1 < 1/2 and 2.5 > 2 leave the loss; 0.7 and 1.0 stay.
    assert keep.tolist() == [[False, True, True, False, False]]
    assert m["rollout/is_masked_frac"].item() == 0.5


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("agg", MODES)
def test_off_policy_corrected_loss_matches_reference(mode, agg):
    """The corrected policy loss on random tensors (an empty response included) against the
    plain-Python reference: the surrogate per token, times min(w, C) (tis) or over the tokens
    inside the band (mis), then aggregated."""
    logps, old, adv, mask = ppo_inputs(5, 7, seed=11)
    behaviour = old + torch.randn(5, 7, generator=gen(12)) * 0.8  # w spread around 1
    weights, keep, m = off_policy_weights(old, behaviour, mask, mode=mode, cap=1.5)
    loss, _ = policy_loss(logps, old, adv, keep, is_weights=weights, aggregation=agg)
    want_w, want_keep, want_m = ref_correction(old, behaviour, mask, mode, 1.5)
    assert keep.tolist() == want_keep
    for key, value in want_m.items():
        assert_close(m[key], value, rtol=1e-5)
    assert 0 < want_m[next(k for k in want_m if k.endswith("_frac"))] < 1  # both branches
    # The reference surrogate per token, weighted, aggregated over the kept tokens.
    per_tok = []
    for r in range(5):
        row = []
        for t in range(7):
            rho = math.exp(min(max(logps[r, t].item() - old[r, t].item(), -20.0), 20.0))
            a = adv[r, t].item()
            v = max(-a * rho, -a * min(max(rho, 0.8), 1.2))
            row.append(v * want_w[r][t])
        per_tok.append(row)
    assert_close(loss, ref_aggregate(per_tok, want_keep, agg), rtol=1e-5)


def test_off_policy_weights_are_one_when_the_engine_agrees_and_empty_is_zero():
    logps, old, adv, mask = ppo_inputs(4, 6, seed=13)
    for mode in ("tis", "mis"):
        weights, keep, m = off_policy_weights(old, old.clone(), mask, mode=mode)
        assert torch.equal(keep, mask)
        assert m["rollout/is_weight_mean"].item() == 1.0 and m["rollout/is_weight_max"] == 1.0
        assert all(v.item() == 0.0 for k, v in m.items() if k.endswith("_frac"))
        corrected, _ = policy_loss(logps, old, adv, keep, is_weights=weights)
        assert corrected.item() == policy_loss(logps, old, adv, mask)[0].item()
    none = torch.zeros(2, 3, dtype=torch.bool)
    _, keep, m = off_policy_weights(old[:2, :3], old[:2, :3] - 5, none, mode="tis")
    assert not keep.any() and all(v.item() == 0.0 for v in m.values())
    with pytest.raises(ValueError, match="off_policy_cap"):
        off_policy_weights(old, old, mask, mode="tis", cap=1.0)
    with pytest.raises(ValueError, match="tis or mis"):
        off_policy_weights(old, old, mask, mode="none")


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_policy_loss_huge_gap_is_finite(gap):
    old = torch.zeros(2, 3)
    logps = torch.full((2, 3), gap, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 0.5, -0.5]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    for dual in (None, 3.0):
        logps.grad = None
        loss, m = policy_loss(logps, old, adv, mask, dual_clip=dual)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
        assert all(torch.isfinite(v) for v in m.values())
        want, _ = ref_policy(logps.detach(), old, adv, mask, 0.2, 0.2, dual, "token_mean")
        assert_close(loss, want, rtol=1e-5)


def test_policy_loss_bf16_inputs():
    logps, old, adv, mask = ppo_inputs(4, 8, seed=5)
    loss16, _ = policy_loss(logps.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss16.dtype == torch.float32
    want, _ = ref_policy(
        logps.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, 0.2, 0.2, None, "token_mean"
    )
    assert_close(loss16, want, rtol=1e-5)
    assert_close(loss16, policy_loss(logps, old, adv, mask)[0].item(), rtol=0, atol=5e-2)


@pytest.mark.parametrize("dual", [1.0, 0.5, -2.0])
def test_policy_loss_dual_clip_must_exceed_one(dual):
    logps, old, adv, mask = ppo_inputs(2, 3, seed=6)
    with pytest.raises(ValueError):
        policy_loss(logps, old, adv, mask, dual_clip=dual)


def test_policy_loss_unknown_aggregation_raises():
    logps, old, adv, mask = ppo_inputs(2, 3, seed=7)
    with pytest.raises(ValueError):
        policy_loss(logps, old, adv, mask, aggregation="sum")


# ---------------------------------------------------------------------------------------------
# value_loss
# ---------------------------------------------------------------------------------------------


def value_inputs(B: int, T: int, seed: int):
    g = gen(seed)
    old = torch.randn(B, T, generator=g)
    values = old + torch.randn(B, T, generator=g) * 0.3
    returns = old + torch.randn(B, T, generator=g)
    mask = random_mask(B, T, g)
    mask[0] = False
    return values, old, returns, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip_range", [0.2, 0.05, None])
def test_value_loss_random_matches_reference(mode, clip_range):
    values, old, returns, mask = value_inputs(5, 6, seed=8)
    loss, m = value_loss(values, old, returns, mask, clip_range=clip_range, aggregation=mode)
    want, want_m = ref_value(values, old, returns, mask, clip_range, mode)
    assert_close(loss, want)
    assert set(m) == set(want_m)
    for key, value in want_m.items():
        assert_close(m[key], value)


def test_value_loss_hand_values_and_gradient():
    # token 0: V = 2, V_old = 1, R = 0, c = 0.2: (V - R)² = 4, V_clip = 1.2 -> 1.44; max = 4
    # token 1: V = 1.5, V_old = 1, R = 2: (V - R)² = 0.25, V_clip = 1.2 -> 0.64; max = 0.64 (clipped)
    # token_mean: ½ (4 + 0.64) / 2 = 1.16; clipfrac = 1/2
    values = torch.tensor([[2.0, 1.5]], requires_grad=True)
    old, returns = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2)
    assert_close(loss, 1.16)
    assert_close(m["value/clipfrac"], 0.5)
    assert_close(m["value/mean"], 1.75)
    loss.backward()
    # d/dV ½ (V - R)² / 2 = (V - R)/2 = 1 on token 0; the clipped branch of token 1 is flat in V
    assert_close(values.grad, [[1.0, 0.0]])
    # unclipped: ½ (4 + 0.25) / 2 = 1.0625
    assert_close(value_loss(values, old, returns, mask, clip_range=None)[0], 1.0625)


def test_value_loss_fully_masked_huge_and_bf16():
    values, old, returns, _ = value_inputs(3, 4, seed=9)
    loss, m = value_loss(values, old, returns, torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in m.values())
    big = torch.full((2, 2), 1e4, requires_grad=True)
    loss, _ = value_loss(
        big, torch.zeros(2, 2), torch.full((2, 2), -1e4), torch.ones(2, 2, dtype=torch.bool)
    )
    loss.backward()
    # ½ (2e4)² = 2e8
    assert_close(loss, 2e8)
    assert torch.isfinite(big.grad).all()
    values, old, returns, mask = value_inputs(4, 6, seed=10)
    loss16, _ = value_loss(values.bfloat16(), old.bfloat16(), returns.bfloat16(), mask)
    assert loss16.dtype == torch.float32
    want, _ = ref_value(
        values.bfloat16(), old.bfloat16(), returns.bfloat16(), mask, 0.2, "token_mean"
    )
    assert_close(loss16, want, rtol=1e-5)
    assert_close(loss16, value_loss(values, old, returns, mask)[0].item(), rtol=0, atol=3e-2)


# ---------------------------------------------------------------------------------------------
# entropy_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_entropy_loss_matches_reference(mode):
    g = gen(11)
    ent = torch.rand(4, 5, generator=g) * 3
    mask = random_mask(4, 5, g)
    mask[2] = False
    loss, m = entropy_loss(ent, mask, coef=0.01, aggregation=mode)
    agg = ref_aggregate(ent.double().tolist(), mask.tolist(), mode)
    # Schulman 2017 eq. 9: the objective adds c2 S, so the loss is -c2 S
    assert_close(loss, -0.01 * agg)
    assert_close(m["policy/entropy"], agg)


def test_entropy_loss_hand_value_gradient_and_empty():
    ent = torch.tensor([[1.0, 3.0, 100.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss, m = entropy_loss(ent, mask, coef=0.5)
    # -0.5 · (1 + 3)/2 = -1; gradient -0.5/2 on counted tokens
    assert_close(loss, -1.0)
    assert_close(m["policy/entropy"], 2.0)
    loss.backward()
    assert_close(ent.grad, [[-0.25, -0.25, 0.0]])
    empty, _ = entropy_loss(ent, torch.zeros(1, 3, dtype=torch.bool), coef=0.5)
    assert empty.item() == 0.0
    assert entropy_loss(ent.detach().bfloat16(), mask, coef=0.5)[0].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# kl_penalty_loss (ppo.kl_penalty=loss)
# ---------------------------------------------------------------------------------------------


def ref_kl(logp: float, ref: float, estimator: str) -> float:
    """Schulman 2020 "Approximating KL divergence": with r = π_ref / π over samples of π,
    k1 = -log r, k2 = (log r)² / 2, k3 = (r - 1) - log r."""
    log_r = ref - logp
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.expm1(log_r) - log_r}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", MODES)
def test_kl_penalty_loss_matches_reference(estimator, mode):
    g = gen(13)
    logps = -torch.rand(5, 6, generator=g, dtype=F64) * 4
    ref = -torch.rand(5, 6, generator=g, dtype=F64) * 4
    mask = random_mask(5, 6, g)
    mask[3] = False
    loss, m = kl_penalty_loss(
        logps.float(), ref.float(), mask, coef=0.3, estimator=estimator, aggregation=mode
    )
    per_token = [
        [ref_kl(a, b, estimator) for a, b in zip(ra, rb, strict=True)]
        for ra, rb in zip(logps.tolist(), ref.tolist(), strict=True)
    ]
    assert_close(loss, 0.3 * ref_aggregate(per_token, mask.tolist(), mode), rtol=1e-5)
    assert_close(m["policy/kl"], ref_aggregate(per_token, mask.tolist(), "token_mean"))
    seq = [
        sum(v for v, k in zip(row, mrow, strict=True) if k)
        for row, mrow in zip(per_token, mask.tolist(), strict=True)
    ]
    assert_close(m["policy/kl_seq"], sum(seq) / len(seq))


def test_kl_penalty_loss_hand_values_gradient_and_empty():
    # One counted token with log π = log 0.5, log π_ref = log 0.25: log r = -log 2, so
    # k3 = 1/2 - 1 + log 2 = log 2 - 1/2; d k3 / d log π = 1 - r = 1/2.
    logps = torch.tensor([[math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 5.0]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    loss, m = kl_penalty_loss(logps, ref, mask, coef=2.0, estimator="k3")
    assert_close(loss, 2.0 * (math.log(2) - 0.5))
    assert_close(m["policy/kl"], math.log(2) - 0.5)
    loss.backward()
    assert_close(logps.grad, [[2.0 * 0.5, 0.0]])
    assert ref.grad is None  # the reference is a constant of the loss
    empty, m0 = kl_penalty_loss(logps, ref, torch.zeros(1, 2, dtype=torch.bool), coef=2.0)
    assert empty.item() == 0.0 and m0["policy/kl_seq"].item() == 0.0
    # Equal distributions: zero penalty, whatever the estimator.
    same = torch.tensor([[-1.5, -0.2]], requires_grad=True)
    for est in ("k1", "k2", "k3"):
        zero, _ = kl_penalty_loss(
            same, same.detach(), torch.ones(1, 2, dtype=torch.bool), coef=1.0, estimator=est
        )
        assert zero.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Bradley–Terry reward loss
# ---------------------------------------------------------------------------------------------


def ref_bradley_terry(chosen, rejected, margin):
    """Llama 2 (Touvron et al. 2023) eq. 2: -log σ(r(x, y_w) - r(x, y_l) - m(r)), batch mean.
    Accuracy and margin metrics use the raw score difference."""
    c, r = chosen.double().tolist(), rejected.double().tolist()
    m = margin.double().tolist() if margin is not None else [0.0] * len(c)
    B = len(c)
    loss = sum(-log_sigmoid(a - b - mm) for a, b, mm in zip(c, r, m, strict=True)) / B
    return loss, {
        "rm/accuracy": sum(1.0 for a, b in zip(c, r, strict=True) if a - b > 0) / B,
        "rm/chosen": sum(c) / B,
        "rm/rejected": sum(r) / B,
        "rm/margin": sum(a - b for a, b in zip(c, r, strict=True)) / B,
    }


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_random_matches_reference(with_margin):
    g = gen(12)
    c, r = torch.randn(16, generator=g) * 2, torch.randn(16, generator=g) * 2
    margin = torch.rand(16, generator=g) * 2 if with_margin else None
    loss, m = bradley_terry_loss(c, r, margin)
    want, want_m = ref_bradley_terry(c, r, margin)
    assert_close(loss, want)
    assert set(m) == set(want_m)
    for key, value in want_m.items():
        assert_close(m[key], value)


def test_bradley_terry_hand_values_and_gradient():
    # -log σ(1 - 0.5) = 0.474077; with margin m = 1: -log σ(-0.5) = 0.974077
    c = torch.tensor([1.0], requires_grad=True)
    r = torch.tensor([0.5], requires_grad=True)
    loss, m = bradley_terry_loss(c, r)
    assert_close(loss, 0.4740769841801067)
    assert m["rm/accuracy"].item() == 1.0
    loss, m = bradley_terry_loss(c, r, torch.tensor([1.0]))
    assert_close(loss, 0.9740769841801067)
    # the margin does not change the accuracy metric (raw scores still rank y_w first)
    assert m["rm/accuracy"].item() == 1.0
    assert_close(m["rm/margin"], 0.5)
    loss.backward()
    # d/dr_w -log σ(d) = -σ(-d), d = -0.5: -σ(0.5) = -0.622459
    assert_close(c.grad, [-sigmoid(0.5)])
    assert_close(r.grad, [sigmoid(0.5)])


def test_bradley_terry_huge_gap_single_pair_and_bf16():
    c = torch.tensor([1e4, -1e4], requires_grad=True)
    r = torch.tensor([-1e4, 1e4], requires_grad=True)
    loss, m = bradley_terry_loss(c, r)
    loss.backward()
    # pair 0: -log σ(2e4) = 0; pair 1: -log σ(-2e4) = 2e4 -> mean 1e4
    assert_close(loss, 1e4)
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert_close(c.grad, [0.0, -0.5])
    assert m["rm/accuracy"].item() == 0.5
    g = gen(13)
    c, r = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    loss16, _ = bradley_terry_loss(c.bfloat16(), r.bfloat16())
    assert loss16.dtype == torch.float32
    assert_close(loss16, ref_bradley_terry(c.bfloat16(), r.bfloat16(), None)[0], rtol=1e-5)
    assert_close(loss16, bradley_terry_loss(c, r)[0].item(), rtol=0, atol=2e-2)
    one, _ = bradley_terry_loss(c[:1], r[:1])
    assert_close(one, ref_bradley_terry(c[:1], r[:1], None)[0])


# ---------------------------------------------------------------------------------------------
# classification reward loss
# ---------------------------------------------------------------------------------------------


def ref_cross_entropy(logits, labels):
    """Mean over rows of -log softmax(logits)[label]; accuracy = argmax hits."""
    total, hits = 0.0, 0
    for row, y in zip(logits.double().tolist(), labels.tolist(), strict=True):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[y]
        hits += int(max(range(len(row)), key=row.__getitem__) == y)
    return total / len(labels), hits / len(labels)


def ref_binary_ce(logits, labels):
    """Mean of -[y log σ(s) + (1-y) log σ(-s)]; accuracy = (s > 0) == y."""
    total, hits = 0.0, 0
    for s, y in zip(logits.double().reshape(-1).tolist(), labels.tolist(), strict=True):
        total += -(y * log_sigmoid(s) + (1 - y) * log_sigmoid(-s))
        hits += int((1 if s > 0 else 0) == int(y))
    return total / len(labels), hits / len(labels)


def test_classification_loss_multiclass_matches_reference():
    g = gen(14)
    logits = torch.randn(10, 4, generator=g) * 2
    labels = torch.randint(0, 4, (10,), generator=g)
    loss, m = classification_loss(logits, labels)
    want, acc = ref_cross_entropy(logits, labels)
    assert_close(loss, want)
    assert_close(m["rm/accuracy"], acc)


@pytest.mark.parametrize("shape", [(10,), (10, 1)])
def test_classification_loss_binary_matches_reference(shape):
    g = gen(15)
    logits = torch.randn(*shape, generator=g) * 2
    labels = torch.randint(0, 2, (10,), generator=g)
    loss, m = classification_loss(logits, labels)
    want, acc = ref_binary_ce(logits, labels)
    assert_close(loss, want)
    assert_close(m["rm/accuracy"], acc)


def test_classification_loss_hand_values_extremes_and_bf16():
    # binary, score 0: -log σ(0) = log 2 = 0.693147 whatever the label
    assert_close(
        classification_loss(torch.tensor([0.0, 0.0]), torch.tensor([0, 1]))[0], math.log(2)
    )
    # two classes, logits [0, ln 3], label 1: -log(3/4) = 0.287682
    loss, m = classification_loss(torch.tensor([[0.0, math.log(3)]]), torch.tensor([1]))
    assert_close(loss, -math.log(0.75))
    assert m["rm/accuracy"].item() == 1.0
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    loss, _ = classification_loss(logits, torch.tensor([1, 1]))
    loss.backward()
    # row 0: -log softmax = 2e4, row 1: 0 -> mean 1e4
    assert_close(loss, 1e4)
    assert torch.isfinite(logits.grad).all()
    g = gen(16)
    logits = torch.randn(6, 3, generator=g)
    labels = torch.randint(0, 3, (6,), generator=g)
    loss16, _ = classification_loss(logits.bfloat16(), labels)
    assert loss16.dtype == torch.float32
    assert_close(loss16, classification_loss(logits, labels)[0].item(), rtol=0, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sft_loss_matches_reference(mode):
    g = gen(17)
    logps = -torch.rand(4, 9, generator=g) * 6
    mask = random_mask(4, 9, g)
    mask[3] = False  # a prompt-only row
    logps = torch.where(mask, logps, torch.full_like(logps, -1e6))  # prompt positions: garbage
    loss, m = sft_loss(logps, mask, mode)
    # NLL = -Σ log π(y_t) over the trained tokens, reduced per `mode`
    want = ref_aggregate((-logps.double()).tolist(), mask.tolist(), mode)
    assert_close(loss, want)
    assert_close(m["sft/nll"], want)
    assert m["sft/tokens"].item() == float(mask.sum())


def test_sft_loss_hand_values_gradient_empty_and_bf16():
    logps = torch.tensor([[math.log(0.5), math.log(0.25), -7.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss, m = sft_loss(logps, mask)
    # (log 2 + log 4)/2 = 1.5 log 2 = 1.039721
    assert_close(loss, 1.5 * math.log(2))
    assert m["sft/tokens"].item() == 2.0
    loss.backward()
    assert_close(logps.grad, [[-0.5, -0.5, 0.0]])
    empty, _ = sft_loss(logps.detach(), torch.zeros(1, 3, dtype=torch.bool))
    assert empty.item() == 0.0
    g = gen(18)
    lp = -torch.rand(3, 5, generator=g) * 4
    mk = random_mask(3, 5, g)
    loss16, _ = sft_loss(lp.bfloat16(), mk)
    assert loss16.dtype == torch.float32
    assert_close(loss16, sft_loss(lp, mk)[0].item(), rtol=0, atol=2e-2)
    huge, _ = sft_loss(torch.full((2, 2), -1e4), torch.ones(2, 2, dtype=torch.bool))
    assert_close(huge, 1e4)
