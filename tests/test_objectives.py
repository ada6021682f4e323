"""Objectives on a real tiny model, checked against a separate straightforward computation:
each sequence run alone (no padding), log-probs summed token by token with log_softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.config import ModelConfig, load_config
from rlhf.data import load_split, make_collator
from rlhf.models import load_model
from rlhf.objectives import objective_for, reference_logps


@pytest.fixture(scope="module")
def model(tiny_path):
    torch.manual_seed(0)
    m = load_model(ModelConfig(name_or_path=str(tiny_path)))
    m.eval()  # no dropout in the tiny Llama anyway; keeps the comparison exact
    return m


def features(cfg, fmt, tok, n=3):
    # Rows of different lengths so that padding is exercised.
    ds = load_split(cfg.data.train, cfg.data, fmt, tok)
    return sorted(
        ds.features[:8], key=lambda f: len(getattr(f, "prompt_ids", getattr(f, "input_ids", [])))
    )[-n:]


def alone_logp(model, prompt_ids, response_ids) -> tuple[float, int]:
    """Σ log p(response token | everything before it), one sequence, no padding, float64."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(prompt_ids), ids.shape[1]):
        total += torch.log_softmax(logits[t - 1], -1)[ids[0, t]].item()
    return total, len(response_ids)


def test_dpo_objective_matches_per_sequence_reference(model, tiny_tokenizer):
    cfg = load_config(None, ["data.max_length=64", "dpo.beta=0.2"])
    feats = features(cfg, "preference", tiny_tokenizer)
    batch = make_collator("preference", tiny_tokenizer.pad_token_id)(feats)
    ref = reference_logps(model, batch)
    # Shift the reference so that the loss is not at its trivial point log(2).
    ref = type(ref)(ref.logps + torch.tensor([0.3, -0.2, 0.1, -0.4, 0.5, 0.0]))
    loss, metrics = objective_for(cfg)(model, batch, ref)
    expected_losses, margins = [], []
    for i, f in enumerate(feats):
        c, _ = alone_logp(model, f.prompt_ids, f.chosen_ids)
        r, _ = alone_logp(model, f.prompt_ids, f.rejected_ids)
        h = (c - ref.logps[i].item()) - (r - ref.logps[len(feats) + i].item())
        expected_losses.append(-math.log(1 / (1 + math.exp(-0.2 * h))))
        margins.append(0.2 * h)
    assert loss.item() == pytest.approx(sum(expected_losses) / len(feats), rel=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(
        sum(margins) / len(feats), rel=1e-4, abs=1e-6
    )


def test_reference_logps_equal_sequence_alone(model, tiny_tokenizer):
    cfg = load_config(None, ["data.max_length=64"])
    feats = features(cfg, "preference", tiny_tokenizer)
    ref = reference_logps(model, make_collator("preference", tiny_tokenizer.pad_token_id)(feats))
    for i, f in enumerate(feats):
        assert ref.logps[i].item() == pytest.approx(
            alone_logp(model, f.prompt_ids, f.chosen_ids)[0], rel=1e-5
        )
        assert ref.logps[len(feats) + i].item() == pytest.approx(
            alone_logp(model, f.prompt_ids, f.rejected_ids)[0], rel=1e-5
        )


def test_orpo_objective_matches_reference(model, tiny_tokenizer):
    cfg = load_config(None, ["algorithm=orpo", "data.max_length=64", "orpo.lambda=0.5"])
    feats = features(cfg, "preference", tiny_tokenizer)
    batch = make_collator("preference", tiny_tokenizer.pad_token_id)(feats)
    loss, metrics = objective_for(cfg)(model, batch, None)
    nll_sum, nll_tokens, ratios = 0.0, 0, []
    for f in feats:
        c, nc = alone_logp(model, f.prompt_ids, f.chosen_ids)
        r, nr = alone_logp(model, f.prompt_ids, f.rejected_ids)
        nll_sum, nll_tokens = nll_sum - c, nll_tokens + nc
        pc, pr = c / nc, r / nr
        log_odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
        ratios.append(math.log(1 / (1 + math.exp(-log_odds))))
    nll = nll_sum / nll_tokens
    assert metrics["nll_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(nll - 0.5 * sum(ratios) / len(ratios), rel=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_objective_matches_cross_entropy(packing, model, tiny_tokenizer):
    cfg = load_config(
        None, ["algorithm=sft", "data.max_length=64", f"data.packing={str(packing).lower()}"]
    )
    feats = features(cfg, "sft", tiny_tokenizer, n=4)
    batch = make_collator("sft", tiny_tokenizer.pad_token_id, 64 if packing else None)(feats)
    loss, _ = objective_for(cfg)(model, batch, None)
    total, count = 0.0, 0
    for f in feats:
        ids = torch.tensor([f.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        labels = ids[0, 1:].clone()
        labels[~torch.tensor(f.loss_mask[1:])] = -100
        total += F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_kto_objective_runs_with_reference(model, tiny_tokenizer):
    cfg = load_config(None, ["algorithm=kto", "data.max_length=64"])
    feats = features(cfg, "unpaired", tiny_tokenizer, n=4)
    batch = make_collator("unpaired", tiny_tokenizer.pad_token_id)(feats)
    ref = reference_logps(model, batch)
    loss, metrics = objective_for(cfg)(model, batch, ref)
    # Policy == reference: every reward is 0 and z0 = 0, so each loss term is w (1 - σ(0)) = 0.5.
    assert loss.item() == pytest.approx(0.5, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="KTO needs reference"):
        objective_for(cfg)(model, batch, None)


def test_reward_objectives(tiny_path, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    cfg = load_config(None, ["algorithm=rm", "data.max_length=64"])
    rm = load_model(ModelConfig(name_or_path=str(tiny_path)), "reward", pad_token_id=pad)
    rm.eval()
    feats = features(cfg, "preference", tiny_tokenizer)
    batch = make_collator("preference", pad)(feats)
    loss, metrics = objective_for(cfg)(rm, batch, None)
    diffs = []
    with torch.no_grad():
        for f in feats:
            c = rm(input_ids=torch.tensor([f.prompt_ids + f.chosen_ids])).logits.item()
            r = rm(input_ids=torch.tensor([f.prompt_ids + f.rejected_ids])).logits.item()
            diffs.append(c - r)
    expected = sum(math.log(1 + math.exp(-d)) for d in diffs) / len(diffs)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["rm/accuracy"].item() == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
    ccfg = load_config(None, ["algorithm=rm", "rm.objective=classification", "data.max_length=64"])
    clf = load_model(
        ModelConfig(name_or_path=str(tiny_path)), "classifier", num_labels=2, pad_token_id=pad
    )
    cfeats = features(ccfg, "classification", tiny_tokenizer, n=4)
    cbatch = make_collator("classification", pad)(cfeats)
    closs, _ = objective_for(ccfg)(clf, cbatch, None)
    logits = clf(input_ids=cbatch.input_ids, attention_mask=cbatch.attention_mask).logits
    assert closs.item() == pytest.approx(F.cross_entropy(logits, cbatch.labels).item(), rel=1e-5)


def test_ppo_objectives_at_ratio_one(model, tiny_path):
    """With old log-probs equal to the current ones, ρ = 1: the surrogate is -mean(A) over the
    response tokens; the value loss is 0.5 vf_coef mean((V - R)^2) when V_old = V."""
    from rlhf.objectives import token_logps, token_values
    from rlhf.types import Experience

    cfg = load_config(
        None,
        [
            "algorithm=ppo",
            "roles.reward.type=function",
            "roles.reward.function=m:f",
            "ppo.vf_coef=0.5",
        ],
    )
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    action = torch.zeros(2, 5, dtype=torch.bool)
    action[:, 2:] = True
    with torch.no_grad():
        old = token_logps(model, ids, attention)
    adv = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)) * action
    critic = load_model(ModelConfig(name_or_path=str(tiny_path)), "critic")
    with torch.no_grad():
        values = token_values(critic, ids, attention)
    returns = (values + 1.0) * action
    exp = Experience(
        ids, attention, action, old * action, adv, returns, values * action, torch.tensor([0, 1])
    )
    loss, metrics = objective_for(cfg)(model, exp, None)
    assert loss.item() == pytest.approx(-(adv[action].sum() / action.sum()).item(), abs=1e-5)
    assert metrics["policy/clipfrac"].item() == 0.0
    vloss, _ = objective_for(cfg, "critic")(critic, exp, None)
    assert vloss.item() == pytest.approx(0.5 * 0.5 * 1.0, abs=1e-5)


def test_token_logps_of_the_response_only(model, tiny_path):
    """start > 0 computes the LM head on the response positions only (logits_to_keep): the
    same log-probs as the full forward from `start` on, 0 before; a model without
    logits_to_keep gets the sliced full logits, with the same result."""
    from rlhf.objectives import _takes_logits_to_keep, token_logps

    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 11], [5, 6, 7, 8, 9, 10, 12]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)

    class Plain(torch.nn.Module):  # forward without logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    assert _takes_logits_to_keep(model) and not _takes_logits_to_keep(Plain(model))
    with torch.no_grad():
        full = token_logps(model, ids, attention)
        for start in (1, 3, 5):
            for m in (model, Plain(model)):
                part = token_logps(m, ids, attention, start)
                assert part.shape == full.shape
                assert torch.all(part[:, :start] == 0)
                torch.testing.assert_close(part[:, start:], full[:, start:], rtol=0, atol=1e-5)


def test_ppo_objective_single_update_and_kl_in_the_loss(model):
    """old_logps=None (one update per row) gives the loss and gradient of recomputed old
    log-probs (ratio 1); with ppo.kl_penalty=loss, KLPenalty adds β·mean k3 over the response
    tokens, from a tensor or from a handle fetched only when needed."""
    from rlhf.kl import kl_estimate
    from rlhf.objectives import KLPenalty, token_logps
    from rlhf.ops import entropy_from_logits
    from rlhf.types import Experience

    cfg = load_config(
        None,
        [
            "algorithm=ppo",
            "roles.reward.type=function",
            "roles.reward.function=m:f",
            "ppo.kl_penalty=loss",
            "ppo.kl_estimator=k3",
        ],
    )
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 11], [5, 6, 7, 8, 9, 10, 12]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)
    action = torch.zeros(2, 6, dtype=torch.bool)
    action[:, 3:] = True
    action[0, 5] = False  # a shorter response
    with torch.no_grad():
        old = token_logps(model, ids, attention)
    adv = torch.randn(2, 6, generator=torch.Generator().manual_seed(1)) * action
    zeros = torch.zeros(2, 6)
    idx = torch.tensor([0, 1])
    objective = objective_for(cfg)

    def loss_and_grad(exp, ref):
        model.zero_grad()
        loss, metrics = objective(model, exp, ref)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return loss.detach(), metrics, grads

    recomputed = Experience(ids, attention, action, old * action, adv, zeros, zeros, idx)
    single = Experience(ids, attention, action, None, adv, zeros, zeros, idx)
    l1, _, g1 = loss_and_grad(recomputed, None)
    l2, m2, g2 = loss_and_grad(single, None)
    assert l2.item() == pytest.approx(l1.item(), abs=1e-6)
    assert m2["policy/ratio"].item() == 1.0
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # The entropy metric: over the response tokens only, from the full logits.
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        want = entropy_from_logits(logits)[action].mean()
    assert m2["policy/entropy"].item() == pytest.approx(want.item(), rel=1e-5)

    ref = (old + 0.3 * torch.randn(2, 6, generator=torch.Generator().manual_seed(2))) * action

    class Handle:
        calls = 0

        def get(self):
            Handle.calls += 1
            return ref

    for given in (ref, Handle()):
        l3, m3, _ = loss_and_grad(single, KLPenalty(0.2, given))
        kl = kl_estimate(old, ref, "k3")[action].mean()
        assert l3.item() == pytest.approx(l2.item() + 0.2 * kl.item(), abs=1e-5)
        assert m3["policy/kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert Handle.calls == 1
