"""Environments from the config (pure, no Ray): the factory's errors name the key and the
fix; the built-in calculator tool; tools rendered into SFT transcripts (data.tools) with the
loss on the assistant's turns only; builtin:calculator's rows."""

from __future__ import annotations

import pytest

from rlhf.config import ConfigError, EnvironmentConfig, load_config
from rlhf.envs import ToolEnv, environment_factory, tool_schema
from rlhf.tools import calculator


def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculator("(3 + 4) * 12") == "84"
    assert calculator(" 37*48 ") == "1776"
    assert calculator("7 / 2") == "3.5" and calculator("8 / 2") == "4"
    assert calculator("-2 ** 3") == "-8"
    for bad in ("__import__('os').system('true')", "x + 1", "len('ab')", "2 ** 1000"):
        with pytest.raises(ValueError):
            calculator(bad)
    schema = tool_schema(calculator)["function"]
    assert schema["name"] == "calculator" and schema["parameters"]["required"] == ["expression"]


def test_the_factory_builds_tool_environments_with_their_schemas():
    make, schemas = environment_factory(
        EnvironmentConfig(
            name="tools",
            tools=["rlhf.tools:calculator"],
            tool_timeout_s=1.0,
            args={"system": "Be brief.", "examples": [{"role": "user", "content": "hi"}]},
        )
    )
    env = make()
    assert isinstance(env, ToolEnv) and env.timeout_s == 1.0 and make() is not env
    assert [s["function"]["name"] for s in schemas] == ["calculator"]
    assert env.reset({"prompt": "What is 2 * 3?"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "What is 2 * 3?"},
    ]
    step = env.step(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "2 * 3"}}</tool_call>'
    )
    assert step.messages == [{"role": "tool", "content": "6"}] and not step.done
    make, schemas = environment_factory(EnvironmentConfig(name="single_turn"))
    assert schemas is None and make().step("x").done
    make, _ = environment_factory(EnvironmentConfig(name="tests.envs:Nudge", args={"turns": 3}))
    assert make().turns == 3


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"name": "tools", "tools": ["nowhere.at_all:calc"]},
            r"tools='nowhere.at_all:calc' cannot be imported",
        ),
        ({"name": "tools", "tools": ["rlhf.tools:_OPS"]}, r"is not a function"),
        (
            {"name": "tools", "tools": ["tests.test_envs:undocumented"]},
            r"tools: tool undocumented: .*docstring",
        ),
        (
            {"name": "tests.envs:Nudge", "args": {"colour": "red"}},
            r"args do not fit tests.envs:Nudge: .*colour",
        ),
        ({"name": "tests.envs:Missing"}, r"name='tests.envs:Missing' cannot be imported"),
        (
            {"name": "tools", "tools": ["rlhf.tools:calculator"], "args": {"sytem": "x"}},
            r"args do not fit tools",
        ),
    ],
)
def test_environment_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message) as err:
        environment_factory(EnvironmentConfig(**section))
    assert "roles.rollout.environment" in str(err.value)


def undocumented(x):
    return x


def test_environment_config_is_checked_when_loaded():
    base = ["algorithm=ppo", "roles.reward.type=function", "roles.reward.function=a:b"]
    with pytest.raises(ConfigError, match="name=tools needs tools"):
        load_config(None, [*base, "roles.rollout.environment.name=tools"])
    with pytest.raises(ConfigError, match=r"must be tools, single_turn or 'package\.module:Class'"):
        load_config(None, [*base, "roles.rollout.environment.name=chess"])
    cfg = load_config(
        None,
        [
            *base,
            "roles.rollout.max_new_tokens=20",
            "roles.rollout.environment.name=tests.envs:Nudge",
        ],
    )
    assert cfg.roles.rollout.episode_tokens == 4 * 20  # max_turns × max_new_tokens
    single = load_config(None, [*base, "roles.rollout.environment.name=single_turn"])
    assert single.roles.rollout.episode_tokens == single.roles.rollout.max_new_tokens


def test_sft_on_tool_transcripts_renders_the_tools_and_trains_the_assistant_turns(tiny_path):
    """builtin:calculator's SFT rows through the chat template with data.tools: the system
    turn holds the tool's schema; the loss covers both assistant turns (the call and the
    answer) and never the tool's result or the prompt."""
    from pathlib import Path

    from rlhf.config import DataConfig, ModelConfig
    from rlhf.data import load_split
    from rlhf.data.arithmetic import calculator_rows
    from rlhf.models import load_tokenizer

    template = Path(__file__).resolve().parents[1] / "rlhf/templates/chatml_tools.jinja"
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_path), chat_template=str(template)))
    data = DataConfig(
        train={"path": "builtin:calculator", "split": "train", "limit": 3},
        tools=["rlhf.tools:calculator"],
        max_length=1024,
    )
    ds = load_split(data.train, data, "sft", tok)
    assert len(ds) == 3
    f = ds[0]
    text = tok.decode(f.input_ids)
    assert '"name": "calculator"' in text.split("<|im_start|>user")[0]  # in the system turn
    trained = tok.decode([i for i, m in zip(f.input_ids, f.loss_mask, strict=True) if m])
    row = next(calculator_rows("train"))
    assert f'"expression": "{row["a"]} * {row["b"]}"' in trained
    assert trained.endswith(row["answer"] + "<|im_end|>\n")
    assert "<tool_response>" not in trained and "What is" not in trained


def test_builtin_calculator_splits_are_disjoint_and_right():
    from rlhf.data.arithmetic import calculator_rows

    train, test = list(calculator_rows("train")), list(calculator_rows("test"))
    assert len(train) == 200 and len(test) == 48
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        assert int(r["answer"]) == r["a"] * r["b"] and 11 <= r["a"] <= 99
        assert r["prompt"].startswith(f"What is {r['a']} * {r['b']}?")


def test_the_tools_quickstart_resolves_and_its_template_only_appends(tiny_path):
    """`rlhf quickstart --task tools`: an SFT stage on tool-use transcripts (data.tools), then
    GRPO over calculator episodes from its model; builtin:chatml_tools renders the tools and
    extends a conversation token-exactly (the multi-turn check accepts it)."""
    from launch.cli import QUICKSTARTS
    from rlhf.config import ModelConfig
    from rlhf.models import load_tokenizer
    from rlhf.pipeline import load_pipeline
    from rlhf.transcripts import environment_turn_ids

    sft, grpo = load_pipeline(QUICKSTARTS["tools"], []).stages
    assert sft.config.algorithm == "sft" and sft.config.data.tools == ["rlhf.tools:calculator"]
    env = grpo.config.roles.rollout.environment
    assert env.name == "tools" and env.tools == sft.config.data.tools
    assert grpo.config.model.name_or_path == str(sft.final)
    tok = load_tokenizer(
        ModelConfig(name_or_path=str(tiny_path), chat_template="builtin:chatml_tools")
    )
    schemas = [tool_schema(calculator)]
    extra = tok.decode(environment_turn_ids(tok, [{"role": "tool", "content": "42"}], schemas))
    assert (
        extra
        == "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    system = tok.apply_chat_template(
        [{"role": "user", "content": "q"}], tools=schemas, tokenize=False
    )
    assert '"name": "calculator"' in system and "<tool_call>" in system


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("builtin:nope", r"no such template \(have builtin:chatml_tools\)"),
        ("missing/t.jinja", "no such file"),
    ],
)
def test_a_chat_template_that_is_not_there_is_an_error(tiny_path, value, message):
    from rlhf.config import ModelConfig
    from rlhf.models import load_tokenizer

    with pytest.raises(ConfigError, match=message):
        load_tokenizer(ModelConfig(name_or_path=str(tiny_path), chat_template=value))


def test_rlhf_check_builds_the_environment(capsys):
    """`rlhf check` builds the environment once: a tool that does not import is one error
    naming the key, before any run."""
    from launch.check import run_check

    base = [
        "model.name_or_path=builtin:tiny",
        "data.max_length=1024",
        "data.max_prompt_length=900",
        "data.train.limit=4",
    ]
    run_check(load_config("launch/quickstart_tools/grpo.yaml", base))
    assert "-- environment: tools (tools: rlhf.tools:calculator)" in capsys.readouterr().out
    bad = load_config(
        "launch/quickstart_tools/grpo.yaml",
        [*base, "roles.rollout.environment.tools=[nowhere:calc]"],
    )
    with pytest.raises(ConfigError, match=r"roles.rollout.environment.tools='nowhere:calc'"):
        run_check(bad)
