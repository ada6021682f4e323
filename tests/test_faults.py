"""Fault handling of online runs: a killed actor stops the run naming its role and the last
checkpoint; `checkpoint.resume=auto` continues; `train.max_restarts` recovers by itself; an
interrupted-and-resumed PPO run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tests.test_train import untimed as untimed_rows

ROOT = Path(__file__).resolve().parents[1]


def ppo_config(tmp_path: Path, steps: int, every: int) -> Path:
    cfg = {
        "algorithm": "ppo",
        "output_dir": str(tmp_path / "out"),
        "data": {"train": {"path": "builtin:reviews"}, "max_length": 48},
        "train": {"global_batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "max_steps": steps},
        "roles": {
            "reward": {"type": "function", "function": "tests.reward_fns:letter_e"},
            "rollout": {"max_new_tokens": 8},
        },
        "ppo": {"estimator": "gae", "kl_coef": 0.05, "kl_target": 1.0},
        "checkpoint": {"every_steps": every, "keep_last": None},
        "logging": {"progress": False},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "launch", "train", str(config), *overrides]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: int = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "checkpoints" / f"step_{step}" / "COMPLETE").exists():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint step_{step} within {timeout}s")


def untimed(path: Path) -> list[dict]:
    """A run's metrics rows without the wall-clock columns (tests.test_train.untimed)."""
    rows = [json.loads(x) for x in (path / "out" / "metrics.jsonl").read_text().splitlines()]
    return untimed_rows(rows)


def kill_role(out: Path, role: str) -> int:
    pid = json.loads((out / "actors.json").read_text())[role][0]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_actor_stops_the_run_and_resume_continues(tmp_path):
    config = ppo_config(tmp_path, steps=40, every=2)
    out = tmp_path / "out"
    proc = start(config, "roles.reward.run_in=actor")  # a function scores in the driver by default
    wait_for_checkpoint(out, proc, 2)
    kill_role(out, "reward")
    code, stdout, stderr = finish(proc)
    assert code == 3, (stdout[-2000:], stderr[-3000:])
    assert "the reward actor died" in stderr
    assert f"the last checkpoint is {out / 'checkpoints'}/step_" in stderr
    assert "checkpoint.resume=auto" in stderr
    last = max(
        int(p.name.split("_")[1])
        for p in (out / "checkpoints").glob("step_*")
        if (p / "COMPLETE").exists()
    )
    code, stdout, stderr = finish(
        start(config, "checkpoint.resume=auto", "train.max_steps=" + str(last + 2))
    )
    assert code == 0, stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{last}'} at step {last}" in stdout
    assert (out / "final" / "model.safetensors").exists()


def kill_and_recover(tmp_path: Path, role: str, *overrides: str) -> list[dict]:
    """A 12-step run with train.max_restarts=1 whose `role` actor is SIGKILLed after the
    step-2 checkpoint: it must restart once, finish, and log every step once. Its rows."""
    config = ppo_config(tmp_path, steps=12, every=2)
    out = tmp_path / "out"
    proc = start(config, "train.max_restarts=1", *overrides)
    wait_for_checkpoint(out, proc, 2)
    kill_role(out, role)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    assert f"the {role} actor died" in stdout and "restarting (1/1)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == 12
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)), "no step lost or logged twice"
    return rows


def test_max_restarts_recovers_by_itself(tmp_path):
    kill_and_recover(tmp_path, "policy")


def test_async_run_recovers_from_a_killed_rollout_actor(tmp_path):
    """max_staleness=1: killing the engine (with a batch in flight, maybe mid-sync) restarts
    every group from the last checkpoint, its in-flight batch included, and loses no step."""
    rows = kill_and_recover(tmp_path, "rollout", "roles.rollout.max_staleness=1")
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)


def test_async_ppo_resume_is_bit_identical(tmp_path):
    """max_staleness=1 with a critic and TIS: the checkpoint keeps the batch in flight (sampled
    by the previous weights), so a run cut after step 3 and resumed ends bit-identical."""
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir()
    cut_dir.mkdir()
    extra = ("roles.rollout.max_staleness=1", "ppo.off_policy_correction=tis")
    code, _, err = finish(start(ppo_config(whole_dir, steps=6, every=3), *extra))
    assert code == 0, err[-3000:]
    config = ppo_config(cut_dir, steps=6, every=3)
    code, stdout, _ = finish(start(config, *extra, env={"RLHF_FAULT_EXIT_AFTER_STEP": "3"}))
    assert code == 17 and "exiting after step 3" in stdout
    assert (cut_dir / "out" / "checkpoints" / "step_3" / "inflight.safetensors").exists()
    code, stdout, err = finish(start(config, *extra, "checkpoint.resume=auto"))
    assert code == 0, err[-3000:]
    a = load_file(whole_dir / "out" / "final" / "model.safetensors")
    b = load_file(cut_dir / "out" / "final" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a), "resumed async PPO diverged"

    rows = untimed(whole_dir)
    assert untimed(cut_dir) == rows
    trained = [r for r in rows if "rollout/staleness_max" in r]
    assert [r["rollout/staleness_max"] for r in trained] == [0, 1, 1, 1, 1, 1]


def test_ppo_resume_is_bit_identical(tmp_path):
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir()
    cut_dir.mkdir()
    # The uninterrupted run scores on a reward actor, the cut one in the driver (the default
    # for a function): where the reward runs must not change a bit.
    code, _, err = finish(
        start(ppo_config(whole_dir, steps=6, every=3), "roles.reward.run_in=actor")
    )
    assert code == 0, err[-3000:]
    config = ppo_config(cut_dir, steps=6, every=3)
    code, stdout, _ = finish(start(config, env={"RLHF_FAULT_EXIT_AFTER_STEP": "3"}))
    assert code == 17 and "exiting after step 3" in stdout
    code, stdout, err = finish(start(config, "checkpoint.resume=auto"))
    assert code == 0, err[-3000:]
    a = load_file(whole_dir / "out" / "final" / "model.safetensors")
    b = load_file(cut_dir / "out" / "final" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a), "resumed PPO diverged from the uninterrupted run"

    assert untimed(cut_dir) == untimed(whole_dir)
