"""Tests of the DPO family, KTO and ORPO against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses.preference import (
    LENGTH_NORMALISED,
    PAIRED_LOSSES,
    REFERENCE_FREE,
    kto_loss,
    orpo_loss,
    preference_loss,
)
from tests.tensors import assert_close, gen

torch.set_num_threads(1)

PAIRED_METRIC_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


# ---------------------------------------------------------------------------------------------
# Independent references (float64, plain Python)
# ---------------------------------------------------------------------------------------------


def log_sigmoid(z: float) -> float:
    """log σ(z), stable for any sign of z."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(log_sigmoid(z))


def ref_dpo(h: float, beta: float, eps: float, gamma: float) -> float:
    """DPO, Rafailov et al. 2023, eq. 7: -log σ(β h), h = log-ratio(chosen) - log-ratio(rejected).
    cDPO label smoothing ε (Mitchell 2023): -(1-ε) log σ(β h) - ε log σ(-β h)."""
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


def ref_robust(h: float, beta: float, eps: float, gamma: float) -> float:
    """Robust DPO, Chowdhury et al. 2024, eq. 8 (unbiased under label-flip rate ε):
    [(1-ε) ℓ(β h) - ε ℓ(-β h)] / (1 - 2ε), ℓ(z) = -log σ(z)."""
    return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)


def ref_ipo(h: float, beta: float, eps: float, gamma: float) -> float:
    """IPO, Azar et al. 2023, eq. 17: (h - 1/(2τ))² with τ = β."""
    return (h - 1 / (2 * beta)) ** 2


def ref_hinge(h: float, beta: float, eps: float, gamma: float) -> float:
    """SLiC-HF calibration (hinge) loss, Zhao et al. 2023, in the β-scaled form: max(0, 1 - β h)."""
    return max(0.0, 1 - beta * h)


def ref_simpo(h: float, beta: float, eps: float, gamma: float) -> float:
    """SimPO, Meng et al. 2024, eq. 6: -log σ(β avg-logp(y_w) - β avg-logp(y_l) - γ)
    (with the same ε label smoothing as cDPO)."""
    z = beta * h - gamma
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


REFS = {
    "sigmoid": ref_dpo,
    "robust": ref_robust,
    "ipo": ref_ipo,
    "hinge": ref_hinge,
    "simpo": ref_simpo,
}


def ref_preference(loss_type, c, r, rc, rr, beta, eps, gamma):
    """Batch mean of the per-pair loss, and TRL-style metrics with implicit reward β × log-ratio
    (reference-free losses: β × log-prob)."""
    c, r = c.double().tolist(), r.double().tolist()
    if loss_type in ("simpo",):
        rc, rr = [0.0] * len(c), [0.0] * len(r)
    else:
        rc, rr = rc.double().tolist(), rr.double().tolist()
    B = len(c)
    losses, rw_c, rw_r = [], [], []
    for i in range(B):
        cr, rj = c[i] - rc[i], r[i] - rr[i]
        losses.append(REFS[loss_type](cr - rj, beta, eps, gamma))
        rw_c.append(beta * cr)
        rw_r.append(beta * rj)
    metrics = {
        "rewards/chosen": sum(rw_c) / B,
        "rewards/rejected": sum(rw_r) / B,
        "rewards/accuracies": sum(1.0 for a, b in zip(rw_c, rw_r, strict=True) if a > b) / B,
        "rewards/margins": sum(a - b for a, b in zip(rw_c, rw_r, strict=True)) / B,
        "logps/chosen": sum(c) / B,
        "logps/rejected": sum(r) / B,
    }
    return sum(losses) / B, metrics


def random_pairs(B: int, seed: int, scale: float = 20.0):
    g = gen(seed)
    c = -torch.rand(B, generator=g) * scale
    r = -torch.rand(B, generator=g) * scale
    rc = c + torch.randn(B, generator=g) * 2
    rr = r + torch.randn(B, generator=g) * 2
    return c, r, rc, rr


# ---------------------------------------------------------------------------------------------
# preference_loss: random inputs against the paper formulas
# ---------------------------------------------------------------------------------------------


def test_exported_sets():
    assert set(REFS) == PAIRED_LOSSES
    assert {"simpo", "orpo"} == REFERENCE_FREE
    assert {"ipo", "simpo", "orpo"} == LENGTH_NORMALISED


@pytest.mark.parametrize("loss_type", sorted(REFS))
@pytest.mark.parametrize(
    ("beta", "eps", "gamma"), [(0.1, 0.0, 0.0), (0.5, 0.2, 0.0), (2.0, 0.1, 0.7), (0.05, 0.0, 1.5)]
)
def test_preference_loss_random_matches_reference(loss_type, beta, eps, gamma):
    c, r, rc, rr = random_pairs(16, seed=sorted(REFS).index(loss_type) * 100 + int(beta * 100))
    loss, metrics = preference_loss(
        loss_type, c, r, rc, rr, beta=beta, label_smoothing=eps, gamma=gamma
    )
    want_loss, want_metrics = ref_preference(loss_type, c, r, rc, rr, beta, eps, gamma)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, want_loss)
    assert set(metrics) == PAIRED_METRIC_KEYS
    for key, want in want_metrics.items():
        assert_close(metrics[key], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# preference_loss: hand-derived values
# ---------------------------------------------------------------------------------------------


def hand_pair():
    # log π(y_w) = -10, log π(y_l) = -12, both reference log-probs -11
    # -> chosen log-ratio +1, rejected -1, h = 2
    t = torch.tensor
    return t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0])


@pytest.mark.parametrize(
    ("loss_type", "eps", "expected"),
    [
        # β h = 0.2: -log σ(0.2) = log(1 + e^-0.2) = 0.598139
        ("sigmoid", 0.0, 0.5981388693815918),
        # cDPO ε = 0.1: 0.9 · 0.598139 + 0.1 · (-log σ(-0.2) = 0.798139) = 0.618139
        ("sigmoid", 0.1, 0.6181388693815918),
        # robust ε = 0.1: (0.9 · 0.598139 - 0.1 · 0.798139) / 0.8 = 0.573139
        ("robust", 0.1, 0.5731388693815918),
        # IPO: (h - 1/(2β))² = (2 - 5)² = 9
        ("ipo", 0.0, 9.0),
        # hinge: max(0, 1 - β h) = 0.8
        ("hinge", 0.0, 0.8),
    ],
)
def test_preference_loss_hand_values(loss_type, eps, expected):
    loss, m = preference_loss(loss_type, *hand_pair(), beta=0.1, label_smoothing=eps)
    assert_close(loss, expected)
    # implicit rewards β × log-ratio: +0.1 and -0.1
    assert_close(m["rewards/chosen"], 0.1)
    assert_close(m["rewards/rejected"], -0.1)
    assert_close(m["rewards/margins"], 0.2)
    assert m["rewards/accuracies"].item() == 1.0
    assert_close(m["logps/chosen"], -10.0)
    assert_close(m["logps/rejected"], -12.0)


def test_hinge_is_zero_past_the_margin_and_robust_equals_dpo_without_noise():
    c, r, rc, rr = (torch.tensor([v]) for v in (-1.0, -30.0, -10.0, -10.0))  # h = 29
    assert preference_loss("hinge", c, r, rc, rr, beta=0.1)[0].item() == 0.0  # 1 - 2.9 < 0
    c, r, rc, rr = random_pairs(8, seed=3)
    dpo, _ = preference_loss("sigmoid", c, r, rc, rr, beta=0.3)
    robust, _ = preference_loss("robust", c, r, rc, rr, beta=0.3, label_smoothing=0.0)
    assert_close(robust, dpo.item())


def test_simpo_hand_value_and_reference_is_ignored():
    # β = 2, γ = 0.5, average log-probs -1.0 and -1.5: z = 2 · 0.5 - 0.5 = 0.5
    # -log σ(0.5) = log(1 + e^-0.5) = 0.474077
    c, r = torch.tensor([-1.0]), torch.tensor([-1.5])
    loss, m = preference_loss("simpo", c, r, beta=2.0, gamma=0.5)
    assert_close(loss, 0.4740769841801067)
    # rewards are β × average log-prob for a reference-free loss
    assert_close(m["rewards/chosen"], -2.0)
    assert_close(m["rewards/rejected"], -3.0)
    with_ref, _ = preference_loss(
        "simpo", c, r, torch.tensor([5.0]), torch.tensor([-7.0]), beta=2.0, gamma=0.5
    )
    assert_close(with_ref, loss.item())


def test_accuracy_metric_counts_strict_wins():
    c = torch.tensor([-1.0, -5.0, -3.0, -2.0])
    r = torch.tensor([-2.0, -4.0, -3.0, -9.0])
    zeros = torch.zeros(4)
    _, m = preference_loss("sigmoid", c, r, zeros, zeros, beta=1.0)
    # chosen reward > rejected for pairs 0 and 3 only (pair 2 is a tie): 2/4
    assert m["rewards/accuracies"].item() == 0.5
    # margins: (1 - 1 + 0 + 7) / 4 = 1.75
    assert_close(m["rewards/margins"], 1.75)


# ---------------------------------------------------------------------------------------------
# preference_loss: gradients, extremes, dtypes, edge cases, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_dpo_gradient_matches_analytic(eps):
    # d/dh of -(1-ε) log σ(βh) - ε log σ(-βh) = β(-(1-ε) σ(-βh) + ε σ(βh)); for ε = 0 this is
    # -β σ(-βh). h depends on chosen logps with +1 and on rejected with -1; the batch mean adds 1/B.
    beta = 0.2
    c, r, rc, rr = random_pairs(5, seed=4)
    c.requires_grad_()
    r.requires_grad_()
    loss, _ = preference_loss("sigmoid", c, r, rc, rr, beta=beta, label_smoothing=eps)
    loss.backward()
    B = 5
    hs = [
        (a - b) - (x - y)
        for a, b, x, y in zip(c.tolist(), rc.tolist(), r.tolist(), rr.tolist(), strict=True)
    ]
    dh = [beta * (-(1 - eps) * sigmoid(-beta * h) + eps * sigmoid(beta * h)) / B for h in hs]
    assert_close(c.grad, dh, rtol=1e-5, atol=1e-7)
    assert_close(r.grad, [-d for d in dh], rtol=1e-5, atol=1e-7)
    if eps == 0.0:
        assert (c.grad < 0).all() and (r.grad > 0).all()  # raises chosen, lowers rejected


def test_ipo_and_hinge_gradients_match_analytic():
    beta = 0.5
    c, r, rc, rr = random_pairs(4, seed=5, scale=2.0)
    hs = [
        (a - b) - (x - y)
        for a, b, x, y in zip(c.tolist(), rc.tolist(), r.tolist(), rr.tolist(), strict=True)
    ]
    c.requires_grad_()
    preference_loss("ipo", c, r, rc, rr, beta=beta)[0].backward()
    # d/dh (h - 1/(2β))² = 2(h - 1/(2β))
    assert_close(c.grad, [2 * (h - 1 / (2 * beta)) / 4 for h in hs], rtol=1e-5)
    c.grad = None
    preference_loss("hinge", c, r, rc, rr, beta=beta)[0].backward()
    # d/dh max(0, 1 - βh) = -β where 1 - βh > 0, else 0
    assert_close(c.grad, [(-beta if 1 - beta * h > 0 else 0.0) / 4 for h in hs])


@pytest.mark.parametrize("loss_type", sorted(REFS))
@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_preference_loss_huge_gap_is_finite(loss_type, gap):
    c = torch.tensor([0.0, -1.0], requires_grad=True)
    r = torch.tensor([-gap, -1.0 - gap], requires_grad=True)  # h = gap (zero references)
    zeros = torch.zeros(2)
    loss, m = preference_loss(loss_type, c, r, zeros, zeros, beta=0.1, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    want, _ = ref_preference(loss_type, c.detach(), r.detach(), zeros, zeros, 0.1, 0.1, 0.0)
    assert_close(loss, want, rtol=1e-5)


def test_dpo_huge_gap_values():
    # β h = -2000: -log σ(-2000) = 2000 (to float precision), gradient -β σ(2000) / B = -0.1
    c = torch.tensor([-1e4], requires_grad=True)
    zeros = torch.zeros(1)
    loss, _ = preference_loss("sigmoid", c, torch.tensor([1e4]), zeros, zeros, beta=0.1)
    loss.backward()
    assert_close(loss, 2000.0)
    assert_close(c.grad, [-0.1])
    # β h = +2000: loss ≈ e^-2000 = 0, gradient 0
    c = torch.tensor([1e4], requires_grad=True)
    loss, _ = preference_loss("sigmoid", c, torch.tensor([-1e4]), zeros, zeros, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-30)
    assert c.grad.abs().item() < 1e-30


@pytest.mark.parametrize("loss_type", sorted(REFS))
def test_preference_loss_bf16_inputs(loss_type):
    c, r, rc, rr = random_pairs(8, seed=6)
    args16 = [t.bfloat16() for t in (c, r, rc, rr)]
    loss16, _ = preference_loss(loss_type, *args16, beta=0.1, label_smoothing=0.1, gamma=0.3)
    assert loss16.dtype == torch.float32
    # exact fp32 formula on the bf16 values ...
    want, _ = ref_preference(loss_type, *args16, 0.1, 0.1, 0.3)
    assert_close(loss16, want, rtol=1e-5)
    # ... and near the fp32 loss (log-probs up to 20 carry ~0.06 of bf16 rounding each)
    loss32, _ = preference_loss(loss_type, c, r, rc, rr, beta=0.1, label_smoothing=0.1, gamma=0.3)
    assert_close(loss16, loss32.item(), rtol=5e-2, atol=5e-2 if loss_type != "ipo" else 1.0)


def test_preference_loss_single_pair_and_metrics_are_detached():
    c, r, rc, rr = random_pairs(1, seed=7)
    c.requires_grad_()
    loss, m = preference_loss("sigmoid", c, r, rc, rr, beta=0.1)
    want, _ = ref_preference("sigmoid", c.detach(), r, rc, rr, 0.1, 0.0, 0.0)
    assert_close(loss, want)
    assert loss.requires_grad
    assert not any(v.requires_grad for v in m.values())


def test_preference_loss_invalid_arguments():
    c, r, rc, rr = random_pairs(2, seed=8)
    with pytest.raises(ValueError):
        preference_loss("dpo_typo", c, r, rc, rr)
    for loss_type in ("sigmoid", "robust", "ipo", "hinge"):
        with pytest.raises(ValueError):
            preference_loss(loss_type, c, r)
        with pytest.raises(ValueError):
            preference_loss(loss_type, c, r, rc, None)


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------


def ref_kto(logps, ref_logps, desirable, z, beta, w_d, w_u):
    """KTO, Ethayarajh et al. 2024, eq. 8: z0 = max(0, KL estimate), r = log π - log π_ref;
    loss = E[λ_y - v(x, y)] with v = λ_D σ(β(r - z0)) (desirable), λ_U σ(β(z0 - r)) (undesirable)."""
    z0 = max(0.0, z)
    losses, rd, ru, ld, lu = [], [], [], [], []
    for lp, rlp, d in zip(
        logps.double().tolist(), ref_logps.double().tolist(), desirable, strict=True
    ):
        r = lp - rlp
        if d:
            losses.append(w_d - w_d * sigmoid(beta * (r - z0)))
            rd.append(beta * r)
            ld.append(lp)
        else:
            losses.append(w_u - w_u * sigmoid(beta * (z0 - r)))
            ru.append(beta * r)
            lu.append(lp)
    metrics = {"kl": z0}
    if rd:
        metrics["rewards/chosen"] = sum(rd) / len(rd)
        metrics["logps/chosen"] = sum(ld) / len(ld)
    if ru:
        metrics["rewards/rejected"] = sum(ru) / len(ru)
        metrics["logps/rejected"] = sum(lu) / len(lu)
    if rd and ru:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return sum(losses) / len(losses), metrics


def kto_inputs(B: int, seed: int):
    g = gen(seed)
    logps = -torch.rand(B, generator=g) * 30
    ref = logps + torch.randn(B, generator=g) * 3
    kl_logps = -torch.rand(B, generator=g) * 30
    ref_kl = kl_logps + torch.randn(B, generator=g) * 3 - 1.0
    desirable = torch.rand(B, generator=g) < 0.5
    desirable[0], desirable[1] = True, False
    return logps, ref, desirable, kl_logps, ref_kl


@pytest.mark.parametrize(
    ("beta", "w_d", "w_u"), [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (1.0, 0.7, 2.0)]
)
def test_kto_random_matches_reference(beta, w_d, w_u):
    logps, ref, desirable, kl_logps, ref_kl = kto_inputs(12, seed=9)
    loss, m = kto_loss(
        logps,
        ref,
        desirable,
        kl_logps,
        ref_kl,
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    z = (
        sum(
            a - b for a, b in zip(kl_logps.double().tolist(), ref_kl.double().tolist(), strict=True)
        )
        / 12
    )
    want, want_m = ref_kto(logps, ref, desirable.tolist(), z, beta, w_d, w_u)
    assert_close(loss, want)
    assert set(m) == set(want_m)
    for key, value in want_m.items():
        assert_close(m[key], value, atol=1e-5)


def test_kto_hand_values():
    # β = 0.1, r = +2 for both rows, z0 = 0:
    # desirable: 1 - σ(0.2) = 0.450166; undesirable (λ_U = 2): 2 (1 - σ(-0.2)) = 2 · 0.549834
    # mean = (0.450166 + 1.099668) / 2 = 0.774917
    logps, ref = torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0])
    loss, m = kto_loss(
        logps,
        ref,
        torch.tensor([True, False]),
        kl=torch.tensor(0.0),
        beta=0.1,
        undesirable_weight=2.0,
    )
    assert_close(loss, (0.45016600268752205 + 2 * 0.549833997312478) / 2)
    assert_close(m["rewards/chosen"], 0.2)
    assert_close(m["rewards/rejected"], 0.2)
    assert_close(m["rewards/margins"], 0.0)


def test_kto_reference_point_is_clamped_and_detached():
    logps, ref, desirable, kl_logps, _ = kto_inputs(6, seed=10)
    # a negative KL estimate is clamped to 0: same loss as kl = 0
    neg, m = kto_loss(logps, ref, desirable, kl=torch.tensor(-3.0))
    zero, _ = kto_loss(logps, ref, desirable, kl=torch.tensor(0.0))
    assert_close(neg, zero.item())
    assert m["kl"].item() == 0.0
    # a positive one shifts the reference point
    pos, m = kto_loss(logps, ref, desirable, kl=torch.tensor(2.5), beta=0.3)
    want, _ = ref_kto(logps, ref, desirable.tolist(), 2.5, 0.3, 1.0, 1.0)
    assert_close(pos, want)
    assert_close(m["kl"], 2.5)
    # z0 carries no gradient (a clearly positive KL, so that the clamp is not what stops it)
    kl_logps.requires_grad_()
    logps.requires_grad_()
    loss, m = kto_loss(logps, ref, desirable, kl_logps, kl_logps.detach() - 2.0)
    assert_close(m["kl"], 2.0)
    loss.backward()
    assert kl_logps.grad is None or torch.count_nonzero(kl_logps.grad) == 0
    assert torch.isfinite(logps.grad).all() and logps.grad.abs().sum() > 0


def test_kto_gradient_matches_analytic():
    # desirable: d/dr λ_D (1 - σ(β(r - z0))) = -λ_D β σ(1 - σ); undesirable: +λ_U β σ(1 - σ)
    beta, w_d, w_u, z0 = 0.4, 1.0, 1.5, 0.8
    logps, ref, desirable, _, _ = kto_inputs(6, seed=11)
    logps = (ref + torch.randn(6, generator=gen(12))).requires_grad_()
    kto_loss(
        logps,
        ref,
        desirable,
        kl=torch.tensor(z0),
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )[0].backward()
    expected = []
    for lp, rlp, d in zip(logps.tolist(), ref.tolist(), desirable.tolist(), strict=True):
        r = lp - rlp
        s = sigmoid(beta * (r - z0) if d else beta * (z0 - r))
        expected.append((-w_d if d else w_u) * beta * s * (1 - s) / 6)
    assert_close(logps.grad, expected, rtol=1e-4, atol=1e-7)


def test_kto_one_sided_batches_and_errors():
    logps, ref, _, kl_logps, ref_kl = kto_inputs(4, seed=13)
    _, m = kto_loss(logps, ref, torch.ones(4, dtype=torch.bool), kl_logps, ref_kl)
    assert "rewards/chosen" in m and "rewards/rejected" not in m and "rewards/margins" not in m
    _, m = kto_loss(logps, ref, torch.zeros(4, dtype=torch.bool), kl_logps, ref_kl)
    assert "rewards/rejected" in m and "rewards/chosen" not in m and "rewards/margins" not in m
    with pytest.raises(ValueError):
        kto_loss(logps, ref, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        kto_loss(logps, ref, torch.ones(4, dtype=torch.bool), kl_logps, None)


def test_kto_huge_gap_and_bf16():
    logps = torch.tensor([0.0, -1e4, 0.0, -1e4], requires_grad=True)
    ref = torch.tensor([-1e4, 0.0, -1e4, 0.0])
    desirable = torch.tensor([True, True, False, False])
    loss, m = kto_loss(logps, ref, desirable, kl=torch.tensor(1e4), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    want, _ = ref_kto(logps.detach(), ref, desirable.tolist(), 1e4, 0.1, 1.0, 1.0)
    assert_close(loss, want)
    lp, rf, d, kl_lp, kl_rf = kto_inputs(8, seed=14)
    loss16, _ = kto_loss(lp.bfloat16(), rf.bfloat16(), d, kl_lp.bfloat16(), kl_rf.bfloat16())
    loss32, _ = kto_loss(lp, rf, d, kl_lp, kl_rf)
    assert loss16.dtype == torch.float32
    assert_close(loss16, loss32.item(), rtol=0, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------------------------


def ref_log1mexp(x: float) -> float:
    """log(1 - e^x): log(-expm1 x) near 0, log1p(-e^x) far from it (both exact in float64)."""
    return math.log(-math.expm1(x)) if x > -1.0 else math.log1p(-math.exp(x))


def ref_orpo(c_avg, r_avg, nll, lam):
    """ORPO, Hong et al. 2024, eqs. 6-7: L = L_SFT + λ E[-log σ(log odds(y_w) - log odds(y_l))],
    odds(y) = P(y) / (1 - P(y)) with log P(y) the length-averaged log-prob."""
    c_avg, r_avg = c_avg.double().tolist(), r_avg.double().tolist()
    B = len(c_avg)
    log_odds = [
        (c - ref_log1mexp(c)) - (r - ref_log1mexp(r)) for c, r in zip(c_avg, r_avg, strict=True)
    ]
    ratios = [log_sigmoid(v) for v in log_odds]
    loss = nll - lam * sum(ratios) / B
    rc, rr = [lam * v for v in c_avg], [lam * v for v in r_avg]
    metrics = {
        "rewards/chosen": sum(rc) / B,
        "rewards/rejected": sum(rr) / B,
        "rewards/accuracies": sum(1.0 for a, b in zip(rc, rr, strict=True) if a > b) / B,
        "rewards/margins": (sum(rc) - sum(rr)) / B,
        "logps/chosen": sum(c_avg) / B,
        "logps/rejected": sum(r_avg) / B,
        "nll_loss": nll,
        "log_odds_ratio": sum(ratios) / B,
        "log_odds_chosen": sum(log_odds) / B,
    }
    return loss, log_odds, metrics


def test_orpo_random_matches_reference():
    g = gen(15)
    c = -torch.rand(10, generator=g) * 3 - 1e-3
    r = -torch.rand(10, generator=g) * 3 - 1e-3
    nll = torch.tensor(1.7)
    loss, m = orpo_loss(c, r, nll, lam=0.25)
    want, _, want_m = ref_orpo(c, r, 1.7, 0.25)
    assert_close(loss, want)
    assert set(m) == set(want_m)
    for key, value in want_m.items():
        assert_close(m[key], value)


def test_orpo_hand_values():
    # P(y_w) = 0.5 -> odds 1, log odds 0; P(y_l) = 0.2 -> odds 0.25, log odds -1.386294
    # log odds ratio = 1.386294, log σ(1.386294) = log(1 / 1.25) = log 0.8 = -0.223144
    # L = 2.0 + 0.1 · 0.223144 = 2.0223144
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, m = orpo_loss(c, r, torch.tensor(2.0), lam=0.1)
    assert_close(loss, 2.0 - 0.1 * math.log(0.8))
    assert_close(m["log_odds_ratio"], math.log(0.8))
    assert_close(m["log_odds_chosen"], math.log(4.0))
    assert_close(m["nll_loss"], 2.0)
    assert_close(m["rewards/chosen"], 0.1 * math.log(0.5))
    assert_close(m["rewards/rejected"], 0.1 * math.log(0.2))
    assert m["rewards/accuracies"].item() == 1.0


def test_orpo_gradient_matches_analytic():
    # d/dp [p - log(1 - e^p)] = 1 / (1 - e^p); d/dx (-log σ(x)) = -σ(-x)
    # => dL/dc_i = -λ/B σ(-L_i) / (1 - e^{c_i}),  dL/dr_i = +λ/B σ(-L_i) / (1 - e^{r_i}), dL/dnll = 1
    lam, B = 0.3, 6
    g = gen(16)
    c = (-torch.rand(B, generator=g) * 2 - 0.05).requires_grad_()
    r = (-torch.rand(B, generator=g) * 2 - 0.05).requires_grad_()
    nll = torch.tensor(1.2, requires_grad=True)
    orpo_loss(c, r, nll, lam=lam)[0].backward()
    _, log_odds, _ = ref_orpo(c.detach(), r.detach(), 1.2, lam)
    cs, rs = c.tolist(), r.tolist()
    assert_close(
        c.grad,
        [-lam / B * sigmoid(-lo) / (1 - math.exp(x)) for lo, x in zip(log_odds, cs, strict=True)],
        rtol=1e-4,
    )
    assert_close(
        r.grad,
        [lam / B * sigmoid(-lo) / (1 - math.exp(x)) for lo, x in zip(log_odds, rs, strict=True)],
        rtol=1e-4,
    )
    assert nll.grad.item() == 1.0


def test_orpo_extreme_log_probs_are_finite():
    # P -> 1 (avg log-prob -1e-9, clamped internally) and P -> 0 (-1e4)
    c = torch.tensor([-1e-9, -1e4, -1e-9, -0.5], requires_grad=True)
    r = torch.tensor([-1e4, -1e-9, -1e-9, -1e4], requires_grad=True)
    loss, m = orpo_loss(c, r, torch.tensor(0.5), lam=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert all(torch.isfinite(v).all() for v in m.values())
    # pair 3 alone: log odds(y_w) = -0.5 - log(1 - e^-0.5) = 0.432752; log odds(y_l) = -1e4 - log 1
    # -> log σ(≈1e4) = 0: the ORPO term vanishes and L = nll = 0.5, with zero gradient
    c3 = c.detach()[3:].clone().requires_grad_()
    loss3, m3 = orpo_loss(c3, r.detach()[3:], torch.tensor(0.5), lam=0.1)
    loss3.backward()
    assert_close(loss3, 0.5)
    assert_close(m3["log_odds_chosen"], -0.5 - math.log(1 - math.exp(-0.5)) + 1e4, rtol=1e-6)
    assert c3.grad.abs().item() < 1e-30


def test_orpo_bf16_inputs():
    g = gen(17)
    c = -torch.rand(8, generator=g) * 3 - 0.05
    r = -torch.rand(8, generator=g) * 3 - 0.05
    loss16, _ = orpo_loss(c.bfloat16(), r.bfloat16(), torch.tensor(1.0), lam=0.1)
    assert loss16.dtype == torch.float32
    want, _, _ = ref_orpo(c.bfloat16(), r.bfloat16(), 1.0, 0.1)
    assert_close(loss16, want, rtol=1e-5)
    assert_close(loss16, orpo_loss(c, r, torch.tensor(1.0), lam=0.1)[0].item(), rtol=0, atol=1e-2)


def test_robust_rejects_a_noise_rate_of_one_half():
    """rDPO divides by 1 - 2ε: ε = 0.5 would be a division by zero (Chowdhury 2024 needs ε < 0.5)."""
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=r"label_smoothing < 0\.5"):
        preference_loss("robust", z, z, z, z, label_smoothing=0.5)
