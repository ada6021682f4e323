"""bench/gpu/run.py: the dry run resolves every planned command on a CPU (CI); the reading of
results and the isolation of failures with faked runs; the generation worker on the CPU; and,
on a GPU machine only, the whole `--quick` run with every row OK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from bench.gpu import run as gpu

ROOT = Path(__file__).resolve().parents[1]


def rows_of(markdown: str) -> list[list[str]]:
    """(check, setting, result, status) rows of the report's first table."""
    lines = markdown.splitlines()
    start = lines.index("| check | setting | result | status |") + 2  # after the rule
    out = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        out.append([c.strip() for c in line.strip("|").split(" | ")])
    return out


# ----------------------------------------------------------------------------- dry run (CI)


@pytest.mark.parametrize(
    ("flags", "gpus"), [(["--quick"], 1), ([], 2), (["--quick", "--model", "tiny"], 4)]
)
def test_dry_run_resolves_every_planned_command(flags, gpus, capsys, monkeypatch):
    monkeypatch.setattr(gpu, "execute", None)  # nothing may run
    assert gpu.main(["--dry-run", "--gpus", str(gpus), *flags]) == 0
    out = capsys.readouterr().out
    commands = [x for x in out.splitlines() if x.strip().startswith("$ ")]
    assert "config ERROR" not in out
    assert out.count("config OK:") == len(commands) >= 6
    assert (
        f"planned for {gpus} GPU(s)" in out
        and f"{len(commands)} of {len(commands)} commands" in out
    )
    zero3 = next(x for x in commands if "train.zero_stage=3" in x)
    assert f"roles.policy.resources.ranks_per_node={gpus}" in zero3
    assert f"train.max_steps={5 if flags else 20}" in zero3


def test_every_override_reads_back_from_its_config(tmp_path):
    from rlhf.config import load_config

    checks = gpu.plan(gpu.QUICK, 2, tmp_path, have_vllm=True)
    assert {c.name for c in checks} == set(gpu.CHECKS)
    for run in (r for c in checks for r in c.runs):
        cfg = load_config(ROOT / run.config, list(run.overrides))
        assert gpu.override_mismatches(cfg, run.overrides) == [], run.label
    qlora = load_config(ROOT / gpu.DPO_CONFIG, list(checks[2].runs[0].overrides))
    assert qlora.model.lora.r == 16 and qlora.model.quantization.load_in_4bit
    assert qlora.train.optimizer == "paged_adamw_8bit" and qlora.train.zero_stage == 0


def test_a_wrong_override_is_an_error(tmp_path):
    run = gpu.Run("bad", gpu.DPO_CONFIG, (f"output_dir={tmp_path}", "train.zero_stag=2"))
    with pytest.raises(ValueError, match="zero_stage"):
        gpu.validate(run, 1, 80.0)


def test_without_a_gpu_nothing_runs(capsys, monkeypatch):
    monkeypatch.setattr(gpu, "visible_gpus", lambda: 0)
    monkeypatch.setattr(gpu, "run_all", None)
    assert gpu.main(["--quick"]) == 0
    assert capsys.readouterr().out.strip() == gpu.NO_GPU


# ----------------------------------------------------------------------------- faked runs


def fake_execute(behaviour: dict[str, str]):
    """An `execute` that writes what a run of each label would leave behind."""

    def execute(run: gpu.Run, work: Path, timeout_s: float) -> gpu.Outcome:
        log = work / f"{run.label}.log"
        out, how = run.out, behaviour[run.label]
        out.mkdir(parents=True, exist_ok=True)
        if how == "crash":
            log.write_text("Traceback ...\nRuntimeError: CUDA error: out of memory\n")
            return gpu.Outcome(run, log, rc=1, wall_s=3.0)
        loss = "nan" if how == "nan" else 0.69
        rows = [
            {
                "step": s,
                "loss": loss if s == 4 else 0.69,
                "timing/step": 0.2,
                "timing/rollout": 0.5,
                "timing/train": 0.3,
                "timing/sync": 0.04,
                "perf/tokens_per_s": 900.0,
                "rollout/staleness_max": min(s - 1, 1),
                "timing/idle/policy": 0.05,
                "timing/idle/rollout": 0.1,
                **(
                    {"reward/accuracy": 0.1 * s, "timing/reward": 0.004}
                    if run.config in (gpu.REASONING_CONFIG, gpu.TOOLS_CONFIG)
                    else {}
                ),
                **(
                    {"rollout/tool_calls": 0.5 + 0.1 * s, "rollout/tool_error_rate": 0.3 / s}
                    if run.config == gpu.TOOLS_CONFIG
                    else {}
                ),
            }
            for s in range(1, 6)
        ]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {"samples_per_s": 40.0, "peak_rss_mb": {"policy": [2048.0]}}
        (out / "summary.json").write_text(json.dumps(summary))
        log.write_text("(PolicyTrainer pid=1) NCCL version 2.27.3+cuda12.9\ndone\n")
        return gpu.Outcome(run, log, rc=0, wall_s=9.0, peak_gpu_gib=3.3)

    return execute


def test_rows_and_isolation_of_failures(tmp_path, monkeypatch):
    checks = gpu.plan(gpu.QUICK, 1, tmp_path / "work", have_vllm=False)
    checks = [c for c in checks if c.name != "generation"]
    behaviour = {
        "zero2": "ok",
        "zero3": "crash",
        "qlora": "nan",
        "sync-hf": "ok",
        "async-hf": "ok",
        "reasoning-hf": "ok",
        "tools-sft": "ok",
        "tools-hf": "ok",
    }
    monkeypatch.setattr(gpu, "execute", fake_execute(behaviour))
    monkeypatch.setattr(gpu, "prepare_assets", lambda model: None)
    args = Namespace(out=tmp_path / "gpu.md", timeout=10, model="smollm2")
    assert gpu.run_all(checks, args, ["--quick"], tmp_path / "work") == 1  # a row FAILED
    rows = {r[0]: r for r in rows_of(args.out.read_text())}
    assert list(rows) == [c.title for c in checks]
    ok = rows["ZeRO-2 policy step"]
    assert ok[3] == "OK" and "40.0 samples/s" in ok[2] and "step 0.200 s" in ok[2]
    assert "peak GPU 3.3 GiB" in ok[2] and "NCCL 2.27.3+cuda12.9" in ok[2]
    crashed = rows["ZeRO-3 policy step"]
    assert crashed[3] == "FAILED" and "exit 1" in crashed[2]
    assert str(tmp_path / "work" / "zero3.log") in crashed[2]
    nan = rows["QLoRA (bitsandbytes)"]
    assert nan[3] == "FAILED" and "loss@4=nan" in nan[2]
    sync = rows["weight sync (hf)"]
    assert sync[3] == "OK" and "sync 40 ms/step" in sync[2] and "900 tokens/s" in sync[2]
    late = rows["async k=1 (hf)"]
    assert late[3] == "OK" and "step 0.20 s (mean of 3), staleness max 1" in late[2]
    assert "idle policy 0.05 s, rollout 0.10 s" in late[2]
    reasoning = rows["reasoning demo (hf)"]
    assert reasoning[3] == "OK" and "training accuracy 0.10 -> 0.50" in reasoning[2]
    assert "timing/reward 0.004 s" in reasoning[2]
    tools = rows["tool-use demo (hf)"]
    assert tools[3] == "OK" and "tool calls/episode 0.60 -> 1.00" in tools[2]
    assert "tool error rate 0.30 -> 0.06" in tools[2] and "accuracy 0.10 -> 0.50" in tools[2]


def test_a_failed_preparing_run_fails_its_check(tmp_path, monkeypatch):
    """The tools check's SFT run crashing fails the row, naming that run's log."""
    (tools,) = [c for c in gpu.plan(gpu.QUICK, 1, tmp_path / "work", False) if c.name == "tools"]
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(gpu, "execute", fake_execute({"tools-sft": "crash", "tools-hf": "ok"}))
    result, status, _ = gpu.run_check(tools, tmp_path / "work", timeout_s=10)
    assert status == "FAILED" and "tools-sft.log" in result


def test_generation_worker_on_cpu(tmp_path):
    """The real worker subprocess with the tiny model on the CPU; vLLM marked missing."""
    overrides = (
        f"output_dir={tmp_path / 'gen'}",
        "model.name_or_path=builtin:tiny",
        "data.chat_prompts=false",
        "data.eval=null",
        "data.train.limit=4",
        "roles.rollout.backend=hf",
        "roles.rollout.n_samples_per_prompt=2",
        "roles.rollout.max_new_tokens=8",
    )
    worker = {"backend": "hf", "prompts": 4, "repeats": 2}
    run = gpu.Run("generation-hf", gpu.ONLINE_CONFIG, overrides, worker=worker)
    check = gpu.Check("generation", "HF vs vLLM generation", "tiny", (run,), missing="vllm")
    result, status, outcomes = gpu.run_check(check, tmp_path, timeout_s=300)
    assert status == "SKIPPED", result
    assert result.startswith("HF ") and result.endswith("tokens/s; vllm not installed")
    assert outcomes[0].rc == 0 and outcomes[0].peak_gpu_gib is None


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_quick_run_on_gpu_every_row_ok(tmp_path):
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, "-m", "bench.gpu.run", "--quick", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), done.stderr[-3000:]
    rows = rows_of(out.read_text())
    assert len(rows) >= 5
    for check, _, result, status in rows:
        vllm_missing = status == "SKIPPED" and result.endswith("vllm not installed")
        assert status == "OK" or vllm_missing, f"{check}: {status} {result}"
    assert done.returncode == 0
