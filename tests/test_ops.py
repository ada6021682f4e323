"""Tests of rlhf.ops against independent float64 references (plain loops with `math`)."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

from rlhf.ops import (
    aggregate,
    entropy_from_logits,
    log1mexp,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    shifted_token_logps,
)
from tests.tensors import F64, assert_close, gen, random_mask

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Independent references (float64, plain Python)
# ---------------------------------------------------------------------------------------------


def ref_logsumexp(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def ref_logprob(row: list[float], label: int) -> float:
    """log softmax(row)[label] = row[label] - log Σ_j exp(row[j])."""
    return row[label] - ref_logsumexp(row)


def ref_entropy(row: list[float]) -> float:
    """H(p) = -Σ_j p_j log p_j with p = softmax(row)."""
    lse = ref_logsumexp(row)
    return -sum(math.exp(v - lse) * (v - lse) for v in row)


def ref_masked_values(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [
        v
        for v, m in zip(x.double().reshape(-1).tolist(), mask.reshape(-1).tolist(), strict=True)
        if m
    ]


def ref_mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else 0.0


def ref_var(vals: list[float], unbiased: bool) -> float:
    n = len(vals)
    if n == 0:
        return 0.0
    mu = ref_mean(vals)
    ss = sum((v - mu) ** 2 for v in vals)
    return ss / (n - 1) if unbiased and n > 1 else ss / n


def ref_aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> float:
    """token_mean: Σ counted / #counted. seq_mean: mean over non-empty rows of the row's token
    mean. seq_mean_token_sum: mean over non-empty rows of the row's token sum."""
    rows = [
        [v for v, m in zip(lr, mr, strict=True) if m]
        for lr, mr in zip(loss.double().tolist(), mask.tolist(), strict=True)
    ]
    if mode == "token_mean":
        return ref_mean([v for r in rows for v in r])
    nonempty = [r for r in rows if r]
    if mode == "seq_mean":
        return ref_mean([sum(r) / len(r) for r in nonempty])
    return ref_mean([sum(r) for r in nonempty])


def ref_log1mexp(x: float) -> float:
    """log(1 - e^x) with enough decimal digits that 1 - e^x keeps 50 significant ones."""
    with localcontext() as ctx:
        ctx.prec = 60 + int(-x / 2.3)
        return float((1 - Decimal(x).exp()).ln())


# ---------------------------------------------------------------------------------------------
# logprobs_from_logits / shifted_token_logps
# ---------------------------------------------------------------------------------------------


def test_logprobs_from_logits_random_matches_reference():
    g = gen(1)
    logits = torch.randn(2, 3, 7, generator=g) * 3
    labels = torch.randint(0, 7, (2, 3), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (2, 3)
    assert out.dtype == torch.float32
    L = logits.double().tolist()
    expected = [[ref_logprob(L[b][t], int(labels[b, t])) for t in range(3)] for b in range(2)]
    assert_close(out, expected)


def test_logprobs_from_logits_hand_values():
    # log softmax([0, 0])[0] = -log 2 = -0.693147
    # log softmax([1, 2, 3])[2] = 3 - log(e + e² + e³) = 3 - 3.407606 = -0.407606
    out = logprobs_from_logits(torch.tensor([[0.0, 0.0, -math.inf]]), torch.tensor([0]))
    assert_close(out, [-0.6931471805599453])
    out = logprobs_from_logits(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]))
    assert_close(out, [-0.40760596444438])


def test_logprobs_from_logits_gradient_is_onehot_minus_softmax():
    # d/dl_j [l_y - logsumexp(l)] = 1[j = y] - softmax(l)_j
    g = gen(2)
    logits = torch.randn(4, 5, generator=g, dtype=F64).requires_grad_()
    labels = torch.tensor([0, 3, 4, 1])
    logprobs_from_logits(logits, labels).sum().backward()
    expected = []
    for row, y in zip(logits.detach().tolist(), labels.tolist(), strict=True):
        lse = ref_logsumexp(row)
        expected.append([(1.0 if j == y else 0.0) - math.exp(v - lse) for j, v in enumerate(row)])
    assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_logprobs_from_logits_huge_logits_finite_values_and_grads():
    logits = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    out = logprobs_from_logits(logits, labels)
    # label 0 holds all the mass: log p = 0; label 1: -1e4 - 1e4 = -2e4
    assert_close(out, [0.0, -2e4], rtol=1e-6, atol=1e-3)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # row 0: onehot(0) - softmax ≈ [0, 0, 0]; row 1: onehot(1) - softmax ≈ [-1, 1, 0]
    assert_close(logits.grad, [[0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]], atol=1e-6)


def test_logprobs_from_logits_bf16_is_float32_and_close():
    g = gen(3)
    logits = torch.randn(3, 4, 11, generator=g) * 2
    labels = torch.randint(0, 11, (3, 4), generator=g)
    out16 = logprobs_from_logits(logits.bfloat16(), labels)
    assert out16.dtype == torch.float32
    # exactly the fp32 computation on the bf16-rounded logits ...
    assert_close(
        out16, logprobs_from_logits(logits.bfloat16().float(), labels), rtol=1e-6, atol=1e-6
    )
    # ... and within bf16 rounding (2^-8 relative on |logit| <~ 8) of the fp32 result
    assert_close(out16, logprobs_from_logits(logits, labels), rtol=0, atol=6e-2)


def test_shifted_token_logps_matches_reference():
    g = gen(4)
    B, T, V = 2, 5, 6
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    out = shifted_token_logps(logits, ids)
    assert out.shape == (B, T - 1)
    L = logits.double().tolist()
    # position t of the output scores token t+1 under the logits at position t
    expected = [[ref_logprob(L[b][t], int(ids[b, t + 1])) for t in range(T - 1)] for b in range(B)]
    assert_close(out, expected)


def test_shifted_token_logps_single_and_no_target_token():
    g = gen(5)
    logits = torch.randn(3, 2, 4, generator=g)
    ids = torch.randint(0, 4, (3, 2), generator=g)
    out = shifted_token_logps(logits, ids)
    assert out.shape == (3, 1)
    L = logits.double().tolist()
    assert_close(out, [[ref_logprob(L[b][0], int(ids[b, 1]))] for b in range(3)])
    # a length-1 sequence has no next token: empty result, no error
    assert shifted_token_logps(logits[:, :1], ids[:, :1]).shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# entropy_from_logits
# ---------------------------------------------------------------------------------------------


def test_entropy_random_matches_reference():
    g = gen(6)
    logits = torch.randn(3, 4, 9, generator=g) * 2
    out = entropy_from_logits(logits)
    assert out.shape == (3, 4)
    assert out.dtype == torch.float32
    L = logits.double().tolist()
    assert_close(out, [[ref_entropy(L[b][t]) for t in range(4)] for b in range(3)])


def test_entropy_hand_values_and_huge_logits():
    # uniform over 4 tokens: H = log 4 = 1.386294; a (numerically) one-hot distribution: H = 0
    assert_close(entropy_from_logits(torch.zeros(4)), math.log(4))
    logits = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    h = entropy_from_logits(logits)
    assert torch.isfinite(h) and abs(h.item()) < 1e-6
    h.backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_gradient_matches_analytic():
    # dH/dl_j = -p_j (log p_j + H)
    g = gen(7)
    logits = torch.randn(6, generator=g, dtype=F64).requires_grad_()
    entropy_from_logits(logits).backward()
    row = logits.detach().tolist()
    lse, H = ref_logsumexp(row), ref_entropy(row)
    expected = [-math.exp(v - lse) * ((v - lse) + H) for v in row]
    assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_entropy_bf16_is_float32_and_close():
    g = gen(8)
    logits = torch.randn(5, 16, generator=g)
    out16 = entropy_from_logits(logits.bfloat16())
    assert out16.dtype == torch.float32
    assert_close(out16, entropy_from_logits(logits), rtol=0, atol=3e-2)


# ---------------------------------------------------------------------------------------------
# masked_sum / masked_mean / masked_var
# ---------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_match_reference_with_garbage_outside_mask():
    g = gen(9)
    x = torch.randn(4, 6, generator=g)
    mask = random_mask(4, 6, g)
    mask[2] = False  # an empty row
    x = torch.where(mask, x, torch.full_like(x, 1e6))  # garbage that must not leak in
    vals = ref_masked_values(x, mask)
    assert_close(masked_sum(x, mask), sum(vals))
    assert_close(masked_mean(x, mask), ref_mean(vals))
    rows = [ref_masked_values(x[b], mask[b]) for b in range(4)]
    assert_close(masked_sum(x, mask, dim=1), [sum(r) for r in rows])
    # the empty row's mean is 0, not NaN
    assert_close(masked_mean(x, mask, dim=1), [ref_mean(r) for r in rows])
    # a float 0/1 mask gives the same as the bool mask
    assert_close(masked_mean(x, mask.float(), dim=1), [ref_mean(r) for r in rows])


def test_masked_mean_hand_values_and_fully_masked():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # (1 + 2) / 2 = 1.5 over everything; per row: 1.5 and 0 (empty)
    assert_close(masked_mean(x, mask), 1.5)
    assert_close(masked_mean(x, mask, dim=-1), [1.5, 0.0])
    assert_close(masked_sum(x, mask, dim=0), [1.0, 2.0, 0.0])
    empty = torch.zeros_like(mask)
    assert masked_mean(x, empty).item() == 0.0
    assert masked_sum(x, empty).item() == 0.0


def test_masked_mean_gradient_only_reaches_counted_positions():
    x = torch.randn(2, 4, generator=gen(10)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    masked_mean(x, mask).backward()
    # d/dx_i of Σ_counted x / 4 = 1/4 on counted positions, 0 elsewhere
    assert_close(x.grad, [[0.25, 0.25, 0.25, 0.0], [0.25, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_reference(unbiased):
    g = gen(11)
    x = torch.randn(5, 7, generator=g) * 3 + 1
    mask = random_mask(5, 7, g)
    x = torch.where(mask, x, torch.full_like(x, -1e5))
    assert_close(
        masked_var(x, mask, unbiased=unbiased), ref_var(ref_masked_values(x, mask), unbiased)
    )


def test_masked_var_hand_values_and_degenerate_masks():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # values 1, 2, 3: mean 2, Σ(x-μ)² = 2 -> biased 2/3, unbiased 1
    assert_close(masked_var(x, mask, unbiased=False), 2 / 3)
    assert_close(masked_var(x, mask, unbiased=True), 1.0)
    # one value: variance 0 (no division by n - 1 = 0); nothing counted: 0, not NaN
    assert masked_var(x, torch.tensor([False, True, False, False])).item() == 0.0
    assert masked_var(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------
# masked_whiten
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
    g = gen(12)
    x = torch.randn(4, 6, generator=g) * 5 + 3
    mask = random_mask(4, 6, g)
    mask[1] = False
    vals = ref_masked_values(x, mask)
    mu, var = ref_mean(vals), ref_var(vals, unbiased=True)
    expected = [
        [
            ((v - mu) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)) if m else 0.0
            for v, m in zip(xr, mr, strict=True)
        ]
        for xr, mr in zip(x.double().tolist(), mask.tolist(), strict=True)
    ]
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if shift_mean:
        w = ref_masked_values(out, mask)
        assert abs(ref_mean(w)) < 1e-5
        assert abs(ref_var(w, unbiased=True) - 1.0) < 1e-4


def test_masked_whiten_fully_masked_and_single_token():
    x = torch.tensor([[3.0, -2.0], [5.0, 7.0]])
    out = masked_whiten(x, torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 2))
    # one counted token: mean = x, var = 0 -> whitened value 0, everything finite
    out = masked_whiten(x, torch.tensor([[True, False], [False, False]]))
    assert torch.isfinite(out).all()
    assert_close(out, [[0.0, 0.0], [0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "seq_mean_token_sum"])
def test_aggregate_matches_reference(mode):
    g = gen(13)
    loss = torch.randn(6, 8, generator=g)
    mask = random_mask(6, 8, g)
    mask[3] = False  # an empty response is left out
    assert_close(aggregate(loss, mask, mode), ref_aggregate(loss, mask, mode))


def test_aggregate_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # token_mean: (1+2+3+4)/4 = 2.5; seq_mean: (2 + 4)/2 = 3; seq_mean_token_sum: (6 + 4)/2 = 5
    assert_close(aggregate(loss, mask, "token_mean"), 2.5)
    assert_close(aggregate(loss, mask, "seq_mean"), 3.0)
    assert_close(aggregate(loss, mask, "seq_mean_token_sum"), 5.0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "seq_mean_token_sum"])
def test_aggregate_fully_masked_is_zero(mode):
    loss = torch.randn(3, 4, generator=gen(14)).requires_grad_()
    out = aggregate(loss, torch.zeros(3, 4, dtype=torch.bool), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(3, 4))


def test_aggregate_seq_mean_gradient():
    # seq_mean = 1/S Σ_b 1/n_b Σ_t l_bt over the S non-empty rows -> d/dl_bt = 1/(S n_b)
    loss = torch.zeros(3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    aggregate(loss, mask, "seq_mean").backward()
    assert_close(loss.grad, [[1 / 8] * 4, [1 / 4, 1 / 4, 0, 0], [0] * 4])


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError):
        aggregate(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), "sum")


# ---------------------------------------------------------------------------------------------
# log1mexp
# ---------------------------------------------------------------------------------------------

LOG1MEXP_POINTS = [-1e-12, -1e-6, -1e-3, -0.1, -0.5, -0.69, -0.7, -1.0, -5.0, -20.0, -50.0, -700.0]


def test_log1mexp_float64_matches_high_precision_reference():
    x = torch.tensor(LOG1MEXP_POINTS, dtype=F64)
    out = log1mexp(x)
    assert out.dtype == F64
    expected = [ref_log1mexp(v) for v in LOG1MEXP_POINTS]
    # relative accuracy everywhere, including -700 where log(1 - e^x) ≈ -e^x ≈ -9.86e-305
    for got, want in zip(out.tolist(), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)


def test_log1mexp_float32_relative_accuracy():
    pts = [p for p in LOG1MEXP_POINTS if p <= -1e-6 and p >= -80]
    out = log1mexp(torch.tensor(pts, dtype=torch.float32))
    assert out.dtype == torch.float32
    for got, x in zip(out.tolist(), pts, strict=True):
        # compare against the reference at the float32-rounded input
        want = ref_log1mexp(float(torch.tensor(x, dtype=torch.float32)))
        assert got == pytest.approx(want, rel=2e-6, abs=0.0)


def test_log1mexp_gradient_and_endpoints_finite():
    # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    x = torch.tensor([-0.3, -2.0, -10.0], dtype=F64, requires_grad=True)
    log1mexp(x).sum().backward()
    assert_close(
        x.grad, [-math.exp(v) / (1 - math.exp(v)) for v in (-0.3, -2.0, -10.0)], rtol=1e-10
    )
    # at x = 0 (P = 1) and x = -1e4 everything stays finite
    x = torch.tensor([0.0, -1e-12, -1e4], requires_grad=True)
    out = log1mexp(x)
    assert torch.isfinite(out).all()
    assert out[2].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- robustness (found in review)


def test_entropy_with_masked_vocabulary_is_finite():
    """A -inf logit has probability 0 and adds nothing: H([0, 0, -inf]) = log 2."""
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([math.log(2)]))


def test_masked_reductions_ignore_nan_and_inf_in_masked_positions():
    x = torch.tensor([[1.0, 3.0, float("nan")], [2.0, float("-inf"), float("inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_sum(x, mask).item() == 6.0
    assert masked_mean(x, mask).item() == 2.0
    assert torch.equal(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 2.0]))
    assert torch.isfinite(masked_whiten(x, mask)).all()
    assert aggregate(x, mask, "seq_mean").item() == 2.0


def test_masked_mean_counts_exactly_in_bf16():
    """1001 ones and the mean must be 1, not 1001 / bf16(1001) = 1001 / 1000."""
    x = torch.full((1, 1001), 3.0, dtype=torch.bfloat16)
    mask = torch.ones(1, 1001, dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx(3.0, rel=1e-3)
