"""LR schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.config import TrainConfig
from rlhf.optim import lr_factor, make_scheduler, warmup_steps


def test_warmup_then_decay_by_hand():
    # warm-up 2 of 10 steps: 1/3, 2/3, then 1 at the end of warm-up
    assert [lr_factor(s, 2, 10, "constant") for s in range(4)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1]
    )
    # linear: step 6 of 10 after 2 warm-up steps -> progress 4/8 -> 0.5
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 2, 10, "linear") == pytest.approx(0.0)
    # cosine: halfway -> 0.5 (1 + cos(pi/2)) = 0.5; a quarter -> 0.5 (1 + cos(pi/4))
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(4, 2, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        lr_factor(5, 0, 10, "exp")


def test_scheduler_drives_the_optimizer():
    train = TrainConfig(lr=1.0, warmup_ratio=0.1, lr_scheduler="linear")
    assert warmup_steps(train, 20) == 2
    # A count overrides the ratio (the published recipes give warm-up in steps).
    assert warmup_steps(TrainConfig(warmup_ratio=0.1, warmup_steps=5), 20) == 5
    assert warmup_steps(TrainConfig(warmup_ratio=0.1, warmup_steps=0), 20) == 0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, train, 20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert seen[-1] == pytest.approx(1 / 18)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adamw", "AdamW"),
        ("adamw_8bit", "AdamW8bit"),
        ("paged_adamw_8bit", "PagedAdamW8bit"),
        ("paged_adamw_32bit", "PagedAdamW32bit"),
    ],
)
def test_each_optimizer_choice_builds_its_class_and_takes_an_adam_step(name, cls):
    """Adam's first bias-corrected step moves every weight by lr * g / |g| (here -lr)."""
    from actors.policy import make_optimizer

    p = torch.nn.Parameter(torch.ones(300))
    opt = make_optimizer([p], TrainConfig(optimizer=name, lr=0.1, weight_decay=0.0))
    assert type(opt).__name__ == f"Skippable{cls}"
    p.grad = torch.full((300,), 2.0)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((300,), 0.9), atol=1e-4)


def test_adamw_is_fused_and_matches_adamw_by_hand():
    """Five AdamW steps with weight decay against the update written out (decoupled decay,
    bias-corrected moments), float64 reference."""
    from actors.policy import make_optimizer

    torch.manual_seed(0)
    w0 = torch.randn(7, 5)
    grads = [torch.randn(7, 5) for _ in range(5)]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    p = torch.nn.Parameter(w0.clone())
    cfg = TrainConfig(optimizer="adamw", lr=lr, adam_betas=[b1, b2], weight_decay=wd)
    opt = make_optimizer([p], cfg)
    assert opt.defaults["fused"] is True
    w, m, v = w0.double(), torch.zeros(7, 5).double(), torch.zeros(7, 5).double()
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g = g.double()
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    assert torch.allclose(p.detach().double(), w, atol=1e-6), (p.detach().double() - w).abs().max()


def test_adamw_without_its_fused_kernel_says_why_once(caplog):
    """Parameters the fused kernel cannot take (two devices here) get the plain AdamW, and the
    log says so once per process, naming the devices, not at every optimizer built."""
    from actors.policy import make_optimizer

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="meta"))]
    cfg = TrainConfig(optimizer="adamw", lr=0.1)
    with caplog.at_level("WARNING", logger="actors.policy"):
        opt = make_optimizer(params, cfg)
        make_optimizer(params, cfg)
    assert not opt.defaults.get("fused")
    said = [r.getMessage() for r in caplog.records if "fused" in r.getMessage()]
    assert said == [
        "AdamW runs without its fused kernel (slower): the parameters sit on 2 devices (cpu, meta)"
    ]
