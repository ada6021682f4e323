"""The `rlhf` command end to end in a subprocess (what a user types)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def rlhf(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "launch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


#: A quickstart shrunk for the tests: the tiny model, 2 steps, short responses, 4 held-out prompts.
TINY_QUICKSTART = (
    "logging.progress=false",
    "model.name_or_path=builtin:tiny",
    "train.max_steps=2",
    "roles.rollout.max_new_tokens=8",
    "data.eval.limit=4",
)


def test_quickstart_config_runs_offline(tmp_path):
    """The quickstart's embedded config, shrunk to the tiny model and 2 steps (the full run
    takes ~10 minutes): held-out reward before and after, samples, plot, final model."""
    out = tmp_path / "qs"
    result = rlhf("quickstart", f"output_dir={out}", *TINY_QUICKSTART)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        saved["algorithm"] == "ppo"
        and saved["roles"]["reward"]["function"] == "rlhf.rewards:vader_sentiment"
    )
    # Asynchronous by default: step 2 trains on the batch the initial weights sampled.
    assert saved["roles"]["rollout"]["max_staleness"] == 1
    assert saved["ppo"]["off_policy_correction"] == "tis"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/version"] for r in rows if "rollout/version" in r] == [0, 0]
    assert result.stdout.count("before (") == 3 and "final eval: reward/mean=" in result.stdout
    assert (out / "plot.png").exists() and (out / "final" / "model.safetensors").exists()


def test_reasoning_quickstart_runs_offline(tmp_path):
    """`rlhf quickstart --task reasoning`, shrunk to the tiny model and 2 steps: the verifiable
    reward reads each row's answer; held-out pass@1 and pass@4 before and after; every
    held-out sample is written with its verdict."""
    out = tmp_path / "qs"
    result = rlhf("quickstart", "--task", "reasoning", f"output_dir={out}", *TINY_QUICKSTART)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["roles"]["reward"]["type"] == "verifiable"
    assert saved["data"]["train"]["path"] == "builtin:arithmetic"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= 1 for r in evals)
    assert all("reward/math" in r and "reward/accuracy" in r for r in rows if "reward/mean" in r)
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 * 4 and all("correct" in s and "reason" in s for s in samples)
    assert "pass@4=" in result.stdout and (out / "plot.png").exists()


@pytest.mark.parametrize("name", ["dpo_tiny", "orpo_tiny", "sft_tiny", "rm_tiny"])
def test_check_quickstart_configs(name, tmp_path):
    result = rlhf("check", f"configs/quickstart/{name}.yaml", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("-- first batch"))
    assert "loss=" in line and "nan" not in line.lower()


def test_config_errors_exit_2_with_the_key(tmp_path):
    result = rlhf("config", "configs/quickstart/dpo_tiny.yaml", "dpo.bta=0.3")
    assert result.returncode == 2
    assert "unknown key 'dpo.bta' (did you mean dpo.beta?)" in result.stderr
    ok = rlhf("config", "configs/quickstart/dpo_tiny.yaml", "dpo.beta=0.3")
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["dpo"]["beta"] == 0.3


def test_bad_data_is_reported_with_file_and_row(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": "Q", "chosen": "a"}\n'
    )
    result = rlhf(
        "check",
        "configs/quickstart/dpo_tiny.yaml",
        f"data.train.path={data}",
        "data.eval=null",
        "data.strict=true",
        f"output_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert f"{data} row 2, field 'rejected': missing key 'rejected'" in result.stderr
    lenient = rlhf(
        "check",
        "configs/quickstart/dpo_tiny.yaml",
        f"data.train.path={data}",
        "data.eval=null",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        f"output_dir={tmp_path / 'out'}",
    )
    assert lenient.returncode == 0, lenient.stderr
    assert "1 of 2 rows usable (preference), 1 quarantined -> " in lenient.stdout
    # `rlhf check` writes nothing into output_dir: the bad rows go to a temporary folder.
    listed = Path(lenient.stdout.split("1 quarantined -> ")[1].split()[0])
    assert listed.exists() and "missing key 'rejected'" in listed.read_text()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_check_dpo_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    result = rlhf("check", "configs/quickstart/dpo_smollm2.yaml", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "134.52M parameters" in result.stdout
