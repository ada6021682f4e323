"""Tier 3: configuration — every shipped YAML loads, overrides apply, mistakes are refused
with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from rlhf.config import (
    REDACTED,
    ConfigError,
    RunConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    redact,
)
from rlhf.pipeline import is_pipeline_file

#: Run configs (pipelines and the recipes' CPU-twin overlays are tested in test_recipes.py).
CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
    if not is_pipeline_file(p) and not p.name.startswith("cpu")
)


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # The dump reloads to the same config: nothing is lost or renamed on the way.
    reloaded = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert reloaded == cfg


def test_defaults_are_the_embedded_quickstart():
    cfg = load_config()
    assert cfg.algorithm == "dpo"
    assert cfg.model.name_or_path == "builtin:tiny"
    assert cfg.data.train.path == "builtin:reviews"
    assert cfg.model.trust_remote_code is False
    assert cfg.needs_reference and not cfg.needs_critic


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=0.5") == (["train", "lr"], 0.5)
    assert parse_override("train.max_steps=7") == (["train", "max_steps"], 7)
    assert parse_override("logging.tags=[a, b]") == (["logging", "tags"], ["a", "b"])
    assert parse_override("model.lora=null") == (["model", "lora"], None)
    assert parse_override("output_dir=") == (["output_dir"], "")
    cfg = load_config(
        None, ["train.lr=1e-5", "dpo.beta=0.25", "logging.tags=[x, y]", "model.lora.r=8"]
    )
    assert cfg.train.lr == 1e-5 and cfg.dpo.beta == 0.25 and cfg.logging.tags == ["x", "y"]
    assert cfg.model.lora is not None and cfg.model.lora.r == 8 and cfg.model.lora.alpha == 32


def test_overrides_on_top_of_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: orpo\norpo:\n  lambda: 0.3\ntrain:\n  lr: 8.0e-6\n")
    cfg = load_config(path, ["orpo.lambda=0.1"])
    assert cfg.algorithm == "orpo" and cfg.orpo.lam == 0.1 and cfg.train.lr == 8e-6
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    assert raw == {"a": {"b": 1}}, "overrides must not mutate their input"


#: A valid online-RL config's overrides.
PPO = ["algorithm=ppo", "roles.reward.type=function", "roles.reward.function=m:f"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dpo.bta=0.1"], "unknown key 'dpo.bta' (did you mean dpo.beta?)"),
        (["trian.lr=1"], "unknown key 'trian' (did you mean train?)"),
        (["orpo.lamda=0.1"], "unknown key 'orpo.lamda' (did you mean orpo.lambda?)"),
        (["model.lora.rank=4"], "unknown key 'model.lora.rank' (did you mean model.lora.r?)"),
        (["train.lr=abc"], "train.lr: Input should be a valid number"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (
            ["algorithm=ppx"],
            "algorithm: Input should be 'sft', 'rm', 'dpo', 'kto', 'orpo' or 'ppo'",
        ),
        (
            ["algorithm=orpo", "roles.reference.enabled=true"],
            "algorithm=orpo uses no reference model",
        ),
        (
            ["dpo.loss_type=simpo", "roles.reference.enabled=true"],
            "dpo.loss_type=simpo uses no reference model",
        ),
        (["roles.reference.enabled=false"], "algorithm=dpo needs a reference model"),
        (["algorithm=ppo"], "algorithm=ppo needs a reward source"),
        (
            [
                "algorithm=ppo",
                "roles.reward.type=function",
                "roles.reward.function=m:f",
                "ppo.estimator=grpo",
            ],
            "n_samples_per_prompt >= 2",
        ),
        (
            [
                "algorithm=ppo",
                "roles.reward.type=function",
                "roles.reward.function=m:f",
                "ppo.off_policy_correction=tis",
                "ppo.old_logps=rollout",
            ],
            "set ppo.old_logps=recompute",
        ),
        (["ppo.off_policy_cap=1"], "ppo.off_policy_cap: Input should be greater than 1"),
        (
            [
                "algorithm=ppo",
                "roles.reward.type=function",
                "roles.reward.function=m:f",
                "roles.rollout.hybrid=true",
                "roles.rollout.max_staleness=1",
            ],
            "max_staleness=1 needs separate rollout engines",
        ),
        (
            ["train.global_batch_size=10"],
            "train.global_batch_size=10 is not divisible by train.micro_batch_size (4)",
        ),
        (
            [
                "train.global_batch_size=8",
                "train.micro_batch_size=4",
                "roles.policy.resources.ranks_per_node=3",
            ],
            "x policy ranks (3) = 12",
        ),
        (["model.quantization.load_in_4bit=true"], "set model.lora too"),
        (
            ["model.lora.r=4", "model.quantization.quant_type=nf4", "train.zero_stage=3"],
            "cannot be sharded by ZeRO-3",
        ),
        (["data.max_length=128", "data.max_prompt_length=128"], "must be below data.max_length"),
        (["algorithm=dpo", "data.format=sft"], "algorithm=dpo cannot train on data.format=sft"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "label_smoothing applies to sigmoid"),
        (["dpo.loss_type=robust"], "needs dpo.label_smoothing > 0"),
        (["roles.reward.type=http"], "reward.type=http needs reward.url"),
        (
            [
                "roles.reward.type=model",
                "roles.reward.model.name_or_path=builtin:tiny",
                "roles.reward.run_in=driver",
            ],
            "a reward model runs in an actor",
        ),
        (
            ["roles.reward.type=function", "roles.reward.function=not a path"],
            "must look like 'package.module:function'",
        ),
        (
            [*PPO, "roles.rollout.hybrid=true", "roles.rollout.backend=vllm"],
            "roles.rollout.hybrid generates with the trainer's HF model",
        ),
        (
            [*PPO, "roles.rollout.hybrid=true", "train.zero_stage=3"],
            "roles.rollout.hybrid needs the whole weights on every policy rank",
        ),
        (["data.packing=true"], "data.packing applies to algorithm=sft only"),
        (["checkpoint.resume=/nonexistent/step_3"], "no such checkpoint"),
        (["train.offload_optimizer=true"], "needs train.zero_stage >= 1"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, in_driver",
    [
        (["roles.reward.type=function", "roles.reward.function=m:f"], True),
        (
            [
                "roles.reward.type=function",
                "roles.reward.function=m:f",
                "roles.reward.run_in=actor",
            ],
            False,
        ),
        # A function that asks for a GPU (it runs a model itself) gets an actor with that GPU.
        (
            [
                "roles.reward.type=function",
                "roles.reward.function=m:f",
                "roles.reward.resources.gpus_per_rank=1",
            ],
            False,
        ),
        (["roles.reward.type=http", "roles.reward.url=http://127.0.0.1:1/score"], False),
        (
            [
                "roles.reward.type=http",
                "roles.reward.url=http://127.0.0.1:1/score",
                "roles.reward.run_in=driver",
            ],
            True,
        ),
        (["roles.reward.type=model", "roles.reward.model.name_or_path=builtin:tiny"], False),
    ],
)
def test_reward_runs_in_the_driver_for_a_cpu_function_by_default(overrides, in_driver):
    cfg = load_config(None, overrides)
    assert cfg.roles.reward.in_driver is in_driver


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["train.lr=1", "train.lr.x=2"])


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_derived_facts():
    cfg = load_config(
        None,
        [
            "train.global_batch_size=16",
            "train.micro_batch_size=2",
            "roles.policy.resources.ranks_per_node=2",
        ],
    )
    assert cfg.grad_accum_steps == 4
    orpo = load_config(None, ["algorithm=orpo"])
    assert orpo.reference_free and not orpo.needs_reference and orpo.data_format == "preference"
    rm = load_config(None, ["algorithm=rm", "rm.objective=classification"])
    assert rm.data_format == "classification" and not rm.needs_reference
    ppo = load_config(
        None, ["algorithm=ppo", "roles.reward.type=function", "roles.reward.function=m:f"]
    )
    assert ppo.needs_critic and ppo.needs_reference and ppo.data_format == "prompt"
    grpo = load_config(
        None,
        [
            "algorithm=ppo",
            "roles.reward.type=function",
            "roles.reward.function=m:f",
            "ppo.estimator=grpo",
            "roles.rollout.n_samples_per_prompt=4",
            "ppo.kl_coef=0",
        ],
    )
    assert not grpo.needs_critic and not grpo.needs_reference


def test_dump_redacts_secrets(tmp_path):
    cfg = load_config(
        None,
        [
            "roles.reward.type=http",
            "roles.reward.url=https://alice:hunter2@rm.internal/score",
            "roles.reward.token_env=RM_TOKEN",
            "roles.reward.headers={X-Api-Key: sk-123, Authorization: Bearer abc, Accept: application/json}",
        ],
    )
    text = dump_config(cfg, tmp_path / "config.yaml")
    assert "hunter2" not in text and "sk-123" not in text and "Bearer abc" not in text
    assert (tmp_path / "config.yaml").read_text() == text
    dumped = yaml.safe_load(text)
    reward = dumped["roles"]["reward"]
    assert reward["url"] == f"https://alice:{REDACTED}@rm.internal/score"
    assert reward["headers"] == {
        "X-Api-Key": REDACTED,
        "Authorization": REDACTED,
        "Accept": "application/json",
    }
    assert reward["token_env"] == "RM_TOKEN", "an env-var name is not a secret"
    assert dumped["orpo"]["lambda"] == 0.1, "aliases are dumped as users write them"


def test_redact_nested_and_lists():
    assert redact({"a": [{"api_key": "x", "n": 1}], "password": "", "token": None}) == {
        "a": [{"api_key": REDACTED, "n": 1}],
        "password": "",
        "token": None,
    }


def test_every_field_has_a_docstring():
    from pydantic import BaseModel

    seen, todo = set(), [RunConfig]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
    assert len(seen) > 10


def test_overrides_merge_into_default_sections():
    cfg = load_config(
        None, ["data.train.limit=16", "data.eval={path: builtin:reviews, split: test}"]
    )
    assert cfg.data.train.path == "builtin:reviews" and cfg.data.train.limit == 16
    assert cfg.data.eval is not None and cfg.data.eval.split == "test"
    assert load_config(None, ["data.eval=null"]).data.eval is None
