"""Tier 5: `rlhf train` end to end — real Ray, real DeepSpeed, the tiny model on CPU.

Each run is a subprocess, as a user would start it; assertions read what the run wrote
(metrics.jsonl, checkpoints, quarantine, the final model)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.max_length=64", "logging.progress=false"]


def train(
    out: Path, config: str, *overrides: str, env: dict | None = None, expect: int = 0
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "train",
        f"configs/quickstart/{config}.yaml",
        f"output_dir={out}",
        *TINY,
        *overrides,
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == expect, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock columns (timing/*, and perf/* measured over it: the only ones
    allowed to differ between runs)."""
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in rows]


def last_with(rows: list[dict], key: str) -> dict:
    return [r for r in rows if key in r][-1]


def test_metrics_of_micro_batches_reduce_to_means_and_maxima():
    """Micro-batches', updates' and ranks' metrics become one row: means, except *_max keys,
    whose maximum survives (a mean of maxima would hide the worst token)."""
    from actors.metrics import reduce_metrics

    rows = [
        {"loss": 0.1, "rollout/logp_gap_max": 0.7},
        {"loss": 0.7, "rollout/logp_gap_max": 0.1, "grad_norm": 3.0},
    ]
    out = reduce_metrics(rows)
    assert out == {"grad_norm": 3.0, "loss": (0.1 + 0.7) / 2, "rollout/logp_gap_max": 0.7}
    assert reduce_metrics([]) == {}


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_two_ranks_learns_held_out_preferences(stage, tmp_path):
    out = tmp_path / f"dpo_z{stage}"
    train(
        out,
        "dpo_tiny",
        f"train.zero_stage={stage}",
        "roles.policy.resources.ranks_per_node=2",
        "train.max_steps=12",
        "train.eval_every=4",
    )
    rows = metrics(out)
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert evals[-1]["eval/rewards/accuracies"] > 0.9
    margins = [r["eval/rewards/margins"] for r in evals]
    assert margins[0] < margins[1] < margins[2], margins
    assert all(
        k in rows[0]
        for k in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "lr",
        )
    )
    # Offline steps log each role's idle time too (the reference computes ahead, then waits).
    for r in rows:
        for role in ("policy", "reference"):
            assert 0 <= r[f"timing/idle/{role}"] <= r["timing/step"], (role, r)
    final = out / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert (out / "config.yaml").exists() and (
        out / "checkpoints" / "step_12" / "COMPLETE"
    ).exists()


def test_orpo_and_sft_lower_their_losses(tmp_path):
    for config, key in (("orpo_tiny", "nll_loss"), ("sft_tiny", "loss")):
        out = tmp_path / config
        train(out, config, "train.max_steps=16")
        rows = metrics(out)
        first, end = rows[0][key], sum(r[key] for r in rows[-3:]) / 3
        assert end < 0.9 * first, (config, first, end)
        assert last_with(rows, "eval/loss")["eval/loss"] < rows[0]["loss"]


@pytest.mark.parametrize("objective", ["pairwise", "classification"])
def test_reward_model_separates_reviews(objective, tmp_path):
    out = tmp_path / objective
    train(out, "rm_tiny", f"rm.objective={objective}", "train.max_steps=24", "train.lr=2e-3")
    final = last_with(metrics(out), "eval/rm/accuracy")
    assert final["eval/rm/accuracy"] > 0.9, final


def test_resume_is_bit_identical(tmp_path):
    """Interrupted at an epoch boundary (step 4 of 4 per epoch) and mid-epoch (step 6), then
    resumed with resume=auto: the same final weights and metrics as an uninterrupted run."""
    common = [
        "data.train.limit=32",
        "data.eval=null",
        "train.epochs=2",
        "train.max_steps=null",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=null",
    ]
    whole = tmp_path / "whole"
    train(whole, "orpo_tiny", *common)
    expected = load_file(whole / "final" / "model.safetensors")
    for crash_after in (4, 6):
        out = tmp_path / f"crash{crash_after}"
        crashed = train(
            out,
            "orpo_tiny",
            *common,
            env={"RLHF_FAULT_EXIT_AFTER_STEP": str(crash_after)},
            expect=17,
        )
        assert f"exiting after step {crash_after}" in crashed.stdout
        assert not (out / "final").exists()
        resumed = train(out, "orpo_tiny", *common, "checkpoint.resume=auto")
        assert (
            f"resumed from {out / 'checkpoints' / f'step_{crash_after}'} at step {crash_after}"
            in resumed.stdout
        )
        got = load_file(out / "final" / "model.safetensors")
        assert got.keys() == expected.keys()
        for k in expected:
            assert (got[k] == expected[k]).all(), (
                f"{k} differs after resuming from step {crash_after}"
            )
        assert untimed(metrics(out)) == untimed(metrics(whole))


def test_bad_rows_are_quarantined_and_strict_refuses(tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = [
        {
            "prompt": f"Review film {i}:",
            "chosen": "I loved it, wonderful.",
            "rejected": "I hated it, awful.",
        }
        for i in range(16)
    ]
    lines = [json.dumps(r) for r in good] + [
        '{"prompt": "broken',
        json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}),
    ]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lenient"
    result = train(
        out, "orpo_tiny", f"data.train.path={data}", "data.eval=null", "train.max_steps=2"
    )
    assert "16 of 18 rows usable (preference), 2 quarantined" in result.stdout
    records = [json.loads(x) for x in (out / "quarantine" / "train.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"].split(" (")[0]) for r in records] == [
        (17, "line is not valid JSON"),
        (18, "chosen and rejected are identical"),
    ]
    strict = train(
        tmp_path / "strict",
        "orpo_tiny",
        f"data.train.path={data}",
        "data.eval=null",
        "data.strict=true",
        expect=2,
    )
    assert f"{data} row 17: line is not valid JSON" in strict.stderr


def test_non_finite_loss_skips_then_aborts_keeping_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = train(
        out,
        "orpo_tiny",
        "train.max_steps=8",
        "checkpoint.every_steps=2",
        "train.max_bad_steps=1",
        "data.eval=null",
        env={"RLHF_FAULT_NAN_STEPS": "3,4"},
        expect=3,
    )
    assert "step 3: non-finite loss, update skipped; batch indices [" in result.stdout
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_2'}" in result.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows if r.get("train/skipped")] == [3, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_2"]


def test_kto_trains_with_its_kl_baseline(tmp_path):
    out = tmp_path / "kto"
    train(out, "dpo_tiny", "algorithm=kto", "train.max_steps=3", "data.eval=null")
    rows = metrics(out)
    assert (
        all(r["kl"] >= 0 for r in rows)
        and "rewards/chosen" in rows[-1]
        and "rewards/rejected" in rows[-1]
    )
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4), (
        "policy == reference at step 1: each term is 1 - σ(0)"
    )


def test_lora_precomputed_reference_and_logging_sinks(tmp_path):
    out = tmp_path / "lora"
    cache = tmp_path / "cache"
    train(
        out,
        "dpo_tiny",
        "train.max_steps=4",
        "data.eval=null",
        "dpo.precompute_ref_logps=true",
        "model.lora.r=4",
        "model.lora.alpha=8",
        "train.optimizer=adamw_8bit",
        "logging.wandb=offline",
        "logging.tensorboard=true",
        env={"RLHF_CACHE_DIR": str(cache), "WANDB_MODE": "offline"},
    )
    assert len(list((cache / "ref_logps").glob("*.safetensors"))) == 1, (
        "reference log-probs cached on disk"
    )
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "wandb wrote its offline run"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    final = out / "final"
    assert (final / "model.safetensors").exists() and not (
        final / "adapter_config.json"
    ).exists(), "adapter merged"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["peak_rss_mb"]) == {"policy", "reference"} and summary["samples_per_s"] > 0


def test_qlora_simpo_exports_the_adapter(tmp_path):
    out = tmp_path / "qlora"
    args = (
        "train.max_steps=3",
        "data.eval=null",
        "dpo.loss_type=simpo",
        "dpo.beta=2.0",
        "model.lora.r=4",
        "model.lora.target_modules=[q_proj,v_proj]",
        "model.quantization.quant_type=nf4",
        "model.gradient_checkpointing=true",
        "train.optimizer=paged_adamw_8bit",
        "checkpoint.export=adapter",
    )
    train(out, "dpo_tiny", *args)
    adapter = out / "final" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (
        adapter / "adapter_config.json"
    ).exists()
    info = json.loads((adapter / "rlhf_adapter.json").read_text())
    assert info["kind"] == "causal"
    # The base as the config names it, not a path into this machine's cache (kept apart).
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert info["base"] == peft_cfg["base_model_name_or_path"] == "builtin:tiny"
    assert Path(info["base_path"]).is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert "reference" not in summary["peak_rss_mb"], "SimPO starts no reference actor"
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    # A 4-bit model resumes from its checkpoint (its saved quantisation state is not a key
    # the freshly quantised model lists; strict loading used to refuse it).
    again = train(out, "dpo_tiny", *args, "checkpoint.resume=auto")
    assert f"resumed from {out / 'checkpoints' / 'step_3'} at step 3" in again.stdout
