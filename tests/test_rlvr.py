"""Reasoning-RL features end to end on CPU (real Ray actors, the tiny model): DAPO's dynamic
sampling refills a batch with groups that carry signal (its bound is checked by the DAPO
recipe's CPU twin, tests/test_recipes.py), reading a prompt-row field in the reward; the
reasoning demo config runs a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.test_ppo import rlhf_train


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def kind_config(tmp_path: Path, kinds: list[str], **ppo) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Review number {i} of the film:", "kind": k}) + "\n"
            for i, k in enumerate(kinds)
        )
    )
    cfg = {
        "algorithm": "ppo",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"train": {"path": str(data)}, "max_length": 40},
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 16,
            "lr": 1e-3,
            "lr_scheduler": "constant",
            "max_steps": 2,
        },
        "roles": {
            "reward": {"type": "function", "function": "tests.reward_fns:by_kind"},
            "rollout": {"max_new_tokens": 8, "temperature": 1.0, "n_samples_per_prompt": 4},
        },
        "ppo": {"estimator": "grpo", "kl_coef": 0.0, "dynamic_sampling": True, **ppo},
        "checkpoint": {"every_steps": None},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_dynamic_sampling_refills_the_batch_with_informative_groups(tmp_path):
    # Half the prompts can never separate their samples (their reward is constant).
    kinds = ["flat", "varied"] * 8
    rlhf_train(kind_config(tmp_path, kinds, dynamic_sampling_max_rounds=4))
    out = tmp_path / "out"
    rows = [r for r in metrics(out) if "reward/mean" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["dynamic_sampling/short_groups"] == 0.0
        first = r["dynamic_sampling/informative_frac"]
        assert 0.0 <= first <= 1.0
        assert r["dynamic_sampling/extra_rounds"] >= (1.0 if first < 1.0 else 0.0)
        assert math.isfinite(r["policy/loss"]) and r["policy/clipfrac"] >= 0
    # The last trained batch holds varied prompts only: every group has a signal.
    trained = json.loads((out / "samples.json").read_text())["last_rollout"]
    assert len(trained) == 16
    index = {f"Review number {i} of the film:": k for i, k in enumerate(kinds)}
    assert {index[p.strip()] for p, _, _ in trained} == {"varied"}
