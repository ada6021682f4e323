"""The shipped recipes (configs/recipes/): each loads and resolves with the published
hyperparameters, opens with the command that runs it and the hardware it expects, maps a
local file of its dataset's real schema without losing a row, and its CPU twin (the same
YAML plus the twin's overrides) runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.config import RunConfig, load_config
from rlhf.pipeline import is_pipeline_file, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
SAMPLES = RECIPES / "samples"
#: Every recipe file (stage configs and pipelines); twins are the cpu*.yaml overlays.
RECIPE_FILES = sorted(p for p in RECIPES.glob("*/*.yaml") if not p.name.startswith("cpu"))
#: recipe -> its CPU twin overlay.
TWINS = {
    "llama2-7b-stack-exchange/pipeline.yaml": "llama2-7b-stack-exchange/cpu.yaml",
    "opencalm-7b-marc-ja/pipeline.yaml": "opencalm-7b-marc-ja/cpu.yaml",
    "mistral-7b-orpo/orpo.yaml": "mistral-7b-orpo/cpu.yaml",
    "gpt2-imdb-ppo/ppo.yaml": "gpt2-imdb-ppo/cpu.yaml",
    "distilbert-imdb-lora-rm/rm.yaml": "distilbert-imdb-lora-rm/cpu.yaml",
    "distilbert-imdb-lora-rm/pipeline.yaml": "distilbert-imdb-lora-rm/cpu-pipeline.yaml",
    "qwen2.5-math-1.5b-rlvr/grpo.yaml": "qwen2.5-math-1.5b-rlvr/cpu.yaml",
    "qwen2.5-math-1.5b-rlvr/dapo.yaml": "qwen2.5-math-1.5b-rlvr/cpu-dapo.yaml",
}


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def stage_configs(path: Path, overrides: list[str] | None = None) -> list[RunConfig]:
    if is_pipeline_file(path):
        return [s.config for s in load_pipeline(path, overrides).stages if s.config is not None]
    return [load_config(path, overrides)]


def test_every_recipe_is_covered():
    names = {p.parent.name for p in RECIPE_FILES}
    assert names == {
        "llama2-7b-stack-exchange",
        "opencalm-7b-marc-ja",
        "mistral-7b-orpo",
        "gpt2-imdb-ppo",
        "distilbert-imdb-lora-rm",
        "qwen2.5-math-1.5b-rlvr",
    }
    twinned = {ROOT / "configs" / "recipes" / k for k in TWINS}
    # Every recipe directory has a twin; single-stage files of a pipeline run through it.
    assert {p.parent for p in twinned} == {p.parent for p in RECIPE_FILES}


@pytest.mark.parametrize(
    "path", RECIPE_FILES, ids=lambda p: rel(p).removeprefix("configs/recipes/")
)
def test_recipe_header_and_resolution(path):
    head = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(head)
    assert head and path.read_text().startswith("#"), "a recipe opens with a comment"
    assert "hardware:" in text, "the header says what hardware it expects"
    runs = [line for line in head if "rlhf train configs/recipes/" in line]
    assert runs, "the header shows the command that runs it"
    for line in runs:
        target = line.split("rlhf train ", 1)[1].split()[0]
        assert (ROOT / target).exists(), f"{line!r} names a missing file"
    assert stage_configs(path)  # loads, resolves and validates


@pytest.mark.parametrize(
    "path", RECIPE_FILES, ids=lambda p: rel(p).removeprefix("configs/recipes/")
)
def test_recipe_placement_fits_its_declared_cluster(path):
    """Each stage declares its cluster and puts its roles on GPUs; the plan fits it."""
    from rlhf.placement import plan_placement

    for cfg in stage_configs(path):
        assert cfg.cluster.gpus_per_node and cfg.cluster.gpu_memory_gib, "declares its GPUs"
        assert cfg.roles.policy.resources.gpus_per_rank > 0, "the trainer runs on a GPU"
        plan = plan_placement(cfg).check()
        assert "gpu" in plan.table()


@pytest.mark.parametrize("recipe", sorted(TWINS), ids=str)
def test_twin_placement_fits_one_cpu_node(recipe):
    """The twins ask for no GPU and fit one 2-core node (their local Ray cluster)."""
    from rlhf.placement import NodeSpec, plan_placement

    twin_file = f"configs/recipes/{TWINS[recipe]}"
    for cfg in stage_configs(RECIPES / recipe, [twin_file]):
        plan = plan_placement(cfg, nodes=[NodeSpec("local", "127.0.0.1", cpus=8, gpus=0)])
        plan.check()


def _preset_sample(source) -> Path:
    return SAMPLES / f"{source.preset}.jsonl"


@pytest.mark.parametrize(
    "path", RECIPE_FILES, ids=lambda p: rel(p).removeprefix("configs/recipes/")
)
def test_recipe_data_mapping_on_the_real_schema(path, tiny_path, tmp_path):
    """Each dataset of each stage, read from a local file with the real schema (its preset's
    sample), with the recipe's row format, lengths and chat template: no row is lost."""
    from rlhf.config import ModelConfig
    from rlhf.data import load_datasets
    from rlhf.models import load_tokenizer

    for cfg in stage_configs(path):
        sources = {"train": cfg.data.train, "eval": cfg.data.eval}
        assert all(s is None or s.preset for s in sources.values()), "recipes use a preset"
        local = {
            k: s.model_copy(update={"path": str(_preset_sample(s)), "name": None, "data_dir": None})
            for k, s in sources.items()
            if s is not None
        }
        data = cfg.data.model_copy(update={**local, "strict": True})
        tok = load_tokenizer(
            ModelConfig(name_or_path=str(tiny_path), chat_template=cfg.model.chat_template)
        )
        train, evaluation = load_datasets(data, cfg.data_format, tok, tmp_path)
        for ds in (train, evaluation):
            if ds is not None:
                assert len(ds) == ds.rows_read > 0 and ds.quarantine.count == 0, ds.summary()


def test_published_hyperparameters():
    """Spot checks against the workflows the recipes reproduce."""
    sft, dpo = stage_configs(RECIPES / "llama2-7b-stack-exchange/pipeline.yaml")
    assert sft.model.quantization.quant_type == "nf4"
    assert sft.model.quantization.compute_dtype == "bfloat16"
    assert sft.model.lora.target_modules == ["q_proj", "v_proj"] and sft.data.packing
    assert dpo.algorithm == "dpo" and dpo.dpo.beta == 0.1 and dpo.needs_reference
    assert dpo.logging.wandb == "online"
    assert dpo.model.name_or_path.endswith("sft/final")  # policy = reference = the SFT model
    assert dpo.roles.reference.model is None
    (orpo,) = stage_configs(RECIPES / "mistral-7b-orpo/orpo.yaml")
    assert orpo.orpo.lam == 0.1 and orpo.train.lr == 8e-6
    assert (orpo.train.micro_batch_size, orpo.grad_accum_steps) == (2, 4)
    assert orpo.train.optimizer == "paged_adamw_8bit" and orpo.train.warmup_ratio == 0.1
    assert orpo.train.lr_scheduler == "linear" and orpo.data.max_length == 1024
    assert orpo.train.eval_every == 20
    lora = orpo.model.lora
    assert (lora.r, lora.alpha, lora.dropout) == (16, 16, 0.05) and len(lora.target_modules) == 7
    assert orpo.model.chat_template and orpo.model.attn_implementation == "auto"
    (rm,) = stage_configs(RECIPES / "distilbert-imdb-lora-rm/rm.yaml")
    assert (rm.model.lora.r, rm.model.lora.alpha, rm.model.lora.target_modules) == (
        4,
        32,
        ["q_lin"],
    )
    assert rm.rm.objective == "classification"
    stages = stage_configs(RECIPES / "opencalm-7b-marc-ja/pipeline.yaml")
    assert [c.algorithm for c in stages] == ["sft", "rm", "ppo"]
    assert stages[1].model.name_or_path == "cyberagent/open-calm-small"
    assert stages[2].roles.reward.baseline != 0 and stages[2].model.name_or_path.endswith("merged")


# ----------------------------------------------------------------------------- CPU twins


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def twin(recipe: str, out: Path) -> subprocess.CompletedProcess:
    return run_cli(
        "train",
        f"configs/recipes/{recipe}",
        f"configs/recipes/{TWINS[recipe]}",
        f"output_dir={out}",
    )


@pytest.mark.slow
def test_twin_llama2_sft_then_dpo_and_resume(tmp_path):
    out = tmp_path / "llama2"
    twin("llama2-7b-stack-exchange/pipeline.yaml", out)
    assert (out / "sft" / "final" / "model.safetensors").exists()
    rows = metrics(out / "dpo")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in rows[-1] and f"eval/{key}" in rows[-1], key
    dpo_cfg = (out / "dpo" / "config.yaml").read_text()
    assert str(out / "sft" / "final") in dpo_cfg  # DPO started from the SFT stage's model
    # Run again: both stages are done and skipped, nothing retrains.
    before = (out / "dpo" / "metrics.jsonl").stat().st_mtime
    again = twin("llama2-7b-stack-exchange/pipeline.yaml", out)
    assert again.stdout.count("done earlier") == 2
    assert (out / "dpo" / "metrics.jsonl").stat().st_mtime == before
    # A stage whose config changed since it finished starts over: it does not "resume" from
    # its old final checkpoint (which would re-export the old model untouched).
    old = (out / "dpo" / "final" / "model.safetensors").read_bytes()
    changed = run_cli(
        "train",
        "configs/recipes/llama2-7b-stack-exchange/pipeline.yaml",
        f"configs/recipes/{TWINS['llama2-7b-stack-exchange/pipeline.yaml']}",
        f"output_dir={out}",
        "stages.dpo.dpo.beta=0.2",
    )
    assert changed.stdout.count("done earlier") == 1, changed.stdout[-3000:]
    assert "== stage dpo: starting over, its config or inputs changed since it finished" in (
        changed.stdout
    )
    assert "resumed from" not in changed.stdout
    assert yaml.safe_load((out / "dpo" / "config.yaml").read_text())["dpo"]["beta"] == 0.2
    assert (out / "dpo" / "final" / "model.safetensors").read_bytes() != old


@pytest.mark.slow
def test_twin_opencalm_sft_rm_merge_ppo(tmp_path):
    out = tmp_path / "calm"
    twin("opencalm-7b-marc-ja/pipeline.yaml", out)
    assert (out / "sft" / "final" / "adapter" / "adapter_config.json").exists()
    assert "eval/rm/accuracy" in metrics(out / "rm")[-1]
    assert (out / "merged" / "model.safetensors").exists()
    assert not (out / "merged" / "adapter_config.json").exists()
    ppo = metrics(out / "ppo")
    assert any("reward/mean" in r for r in ppo)
    cfg = load_config(out / "ppo" / "config.yaml")
    assert cfg.model.name_or_path == str(out / "merged")
    assert cfg.roles.reward.model.name_or_path == str(out / "rm" / "final")


@pytest.mark.slow
def test_twin_mistral_orpo(tmp_path):
    out = tmp_path / "orpo"
    twin("mistral-7b-orpo/orpo.yaml", out)
    rows = metrics(out)
    assert rows[-1]["step"] == 3 and any("eval/loss" in r for r in rows)
    assert (out / "final" / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert "reference" not in summary["peak_rss_mb"]  # ORPO needs no reference


@pytest.mark.slow
def test_twin_gpt2_imdb_ppo(tmp_path):
    out = tmp_path / "ppo"
    twin("gpt2-imdb-ppo/ppo.yaml", out)
    rows = [r for r in metrics(out) if "reward/mean" in r]
    assert len(rows) == 2 and all("value/explained_variance" in r for r in rows)


@pytest.mark.slow
def test_twin_lora_classifier_as_reward_model(tmp_path):
    out = tmp_path / "lora-rm"
    twin("distilbert-imdb-lora-rm/pipeline.yaml", out)
    from safetensors import safe_open
    from transformers import AutoConfig

    final = out / "rm" / "final"
    assert AutoConfig.from_pretrained(final).num_labels == 2  # a merged 2-class classifier
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert f.get_slice("score.weight").get_shape()[0] == 2
    assert not (out / "rm" / "final" / "adapter_config.json").exists()
    assert "eval/rm/accuracy" in metrics(out / "rm")[-1]
    cfg = load_config(out / "ppo" / "config.yaml")
    assert cfg.roles.reward.model.name_or_path == str(out / "rm" / "final")
    assert any("reward/mean" in r for r in metrics(out / "ppo"))


@pytest.mark.slow
def test_twin_rlvr_grpo_on_gsm8k(tmp_path):
    out = tmp_path / "grpo"
    twin("qwen2.5-math-1.5b-rlvr/grpo.yaml", out)
    rows = metrics(out)
    train = [r for r in rows if "reward/mean" in r]
    assert len(train) == 2 and all("reward/math" in r and "timing/reward" in r for r in train)
    # the twin verifies in a reward actor, with a pool of 2 spawned processes
    assert "timing/idle/reward" in train[0]
    assert {"eval/pass@1", "eval/pass@2", "eval/mean@2"} <= set(rows[-1])
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    # 4 held-out problems x 2 samples, before and after, each with its verdict
    assert len(samples) == 16 and {s["step"] for s in samples} == {0, 2}
    assert all(set(s) >= {"prompt", "fields", "response", "correct", "reason"} for s in samples)
    assert samples[0]["fields"]["answer"] == "71"


@pytest.mark.slow
def test_twin_rlvr_dapo_on_math_stops_dynamic_sampling_at_its_bound(tmp_path):
    out = tmp_path / "dapo"
    twin("qwen2.5-math-1.5b-rlvr/dapo.yaml", out)
    train = [r for r in metrics(out) if "reward/mean" in r]
    assert len(train) == 2
    for r in train:
        # the tiny model never answers right: no group has a signal, one extra round each
        # step (the twin's bound), then the batch is filled with the dropped groups
        assert r["dynamic_sampling/informative_frac"] == 0.0
        assert r["dynamic_sampling/extra_rounds"] == 1.0
        assert r["dynamic_sampling/short_groups"] == 2.0
        assert r["advantages/mean"] == 0.0 and r["policy/loss"] == 0.0
        # the soft overlong penalty (the last 3 of 16 tokens) is added to the reward
        assert -1.0 <= r["reward/overlong_penalty"] <= 0.0
        shaped = r["reward/mean"] + r["reward/overlong_penalty"]
        assert r["reward/shaped_mean"] == pytest.approx(shaped, abs=1e-6)
