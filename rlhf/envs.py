"""Environments for multi-turn rollouts (pure: no Ray). An episode starts from a prompt row
(`reset(row)` gives the first messages) and goes on while the model's turns ask for more:
`step(assistant text)` returns the environment's messages, an optional reward and whether the
episode is done. Today's single-turn rollouts are the one-turn case (`SingleTurn`).

`ToolEnv` gives the model Python functions as tools: their JSON schemas (from type hints and
docstrings, transformers' `get_json_schema`) go to the chat template's `tools=`; tool calls
in the model's turn (the Hermes / ChatML-family format, `<tool_call>{"name": …, "arguments":
{…}}</tool_call>`) are run with a timeout and answered as `tool` messages. A malformed call,
an unknown tool, a tool that raises or runs past its timeout becomes an error message to the
model (counted in the step's info), never an exception. A turn without a tool call ends the
episode: it is the answer.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf.config import ConfigError, import_object

Messages = list[dict[str, str]]


@dataclass
class Step:
    """What the environment answers to one assistant turn."""

    messages: Messages
    """Its messages for the model (tool results, a user's reply); empty when done."""
    reward: float | None = None
    """A reward for this turn (None: the episode's reward comes from roles.reward)."""
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)
    """Counts for the metrics: tool_calls, tool_errors."""


class Environment(Protocol):
    """roles.rollout.environment names a class implementing this as 'module:Class'."""

    def reset(self, row: Mapping[str, Any]) -> Messages:
        """The first messages of an episode for a prompt row (its `prompt` and fields)."""
        ...

    def step(self, assistant: str) -> Step:
        """The environment's answer to the model's turn (its decoded text)."""
        ...


def prompt_messages(row: Mapping[str, Any]) -> Messages:
    """A row's prompt as messages: a message list as it is, a string as one user turn."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


class SingleTurn:
    """One assistant turn, then done: today's rollouts through the multi-turn path."""

    def reset(self, row: Mapping[str, Any]) -> Messages:
        return prompt_messages(row)

    def step(self, assistant: str) -> Step:
        return Step([], done=True)


# ----------------------------------------------------------------------------- tool calls

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class BadCall:
    """A tool call that cannot run: the text the model wrote and why."""

    text: str
    error: str


def parse_tool_calls(text: str) -> list[ToolCall | BadCall]:
    """Every `<tool_call>{json}</tool_call>` of a turn, in order (the Hermes format of Qwen2.5,
    Hermes and other ChatML-family templates). An opened tag never closed is a bad call."""
    calls: list[ToolCall | BadCall] = []
    for body in _TOOL_CALL.findall(text):
        calls.append(_parse_one(body.strip()))
    tail = text.rsplit("</tool_call>", 1)[-1]
    if "<tool_call>" in tail:
        calls.append(BadCall(tail[tail.index("<tool_call>") :][:200], "<tool_call> never closed"))
    return calls


def _parse_one(body: str) -> ToolCall | BadCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return BadCall(body[:200], f"not JSON ({err.msg})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return BadCall(body[:200], 'expected {"name": …, "arguments": {…}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return BadCall(body[:200], "arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return BadCall(body[:200], "arguments are not a JSON object")
    return ToolCall(call["name"], arguments)


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool function, from its type hints and docstring (what chat
    templates take as `tools=`); raises naming the function when it cannot be described."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # transformers' DocstringParsingException, TypeHintParsingException
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(
            f"tool {name}: {err} (a tool needs type hints and a docstring with an Args section)"
        ) from None


def run_with_timeout(fn: Callable, arguments: dict, timeout_s: float) -> tuple[bool, str]:
    """(ok, text) of fn(**arguments) in a daemon thread: the result as text, or why not
    (the exception, or the timeout). A timed-out thread is left to finish on its own (Python
    cannot stop a thread): give tools that may hang a bound of their own."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["value"] = fn(**arguments)
        except Exception as err:
            out["error"] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return False, f"timed out after {timeout_s:g}s"
    if "error" in out:
        return False, out["error"]
    value = out.get("value")
    return True, value if isinstance(value, str) else json.dumps(value, default=str)


class ToolEnv:
    """The model answers a row's prompt, calling `tools` on the way: each turn's tool calls
    are run (at most `max_calls_per_turn`) and answered with one `tool` message each; a turn
    without a call is the final answer. `system` (a system message) and `examples` (messages
    of worked exchanges, e.g. a call, its result and the answer) go before each prompt: a small
    model that has never seen a tool call may need one to start calling."""

    def __init__(
        self,
        tools: list[Callable],
        timeout_s: float = 5.0,
        max_calls_per_turn: int = 4,
        parser: Callable[[str], list[ToolCall | BadCall]] = parse_tool_calls,
        system: str | None = None,
        examples: list[dict] | None = None,
    ) -> None:
        self.tools = {fn.__name__: fn for fn in tools}
        self.timeout_s, self.max_calls, self.parser = timeout_s, max_calls_per_turn, parser
        self.prefix = [{"role": "system", "content": system}] if system else []
        self.prefix += [dict(m) for m in examples or []]

    def reset(self, row: Mapping[str, Any]) -> Messages:
        return self.prefix + prompt_messages(row)

    def step(self, assistant: str) -> Step:
        calls = self.parser(assistant)
        if not calls:
            return Step([], done=True)
        messages, errors = [], 0
        for call in calls[: self.max_calls]:
            ok, text = self._run(call)
            errors += not ok
            messages.append({"role": "tool", "content": text if ok else f"error: {text}"})
        return Step(messages, info={"tool_calls": float(len(calls)), "tool_errors": float(errors)})

    def _run(self, call: ToolCall | BadCall) -> tuple[bool, str]:
        if isinstance(call, BadCall):
            return False, f"malformed tool call: {call.error}"
        fn = self.tools.get(call.name)
        if fn is None:
            return False, f"unknown tool {call.name!r} (tools: {', '.join(sorted(self.tools))})"
        return run_with_timeout(fn, call.arguments, self.timeout_s)


# ----------------------------------------------------------------------------- from the config


class EnvConfigError(ConfigError):
    """A roles.rollout.environment setting that cannot be built; the message names the key."""


def import_tools(names: list[str], key: str) -> list[Callable]:
    """'module:function' tools imported, each checked to be a function."""
    tools = [import_object(name, key, EnvConfigError) for name in names]
    for fn in tools:
        if not callable(fn):
            raise EnvConfigError(f"{key}: {fn!r} is not a function")
    return tools


def schemas_of(tools: list[Callable], key: str) -> tuple[dict, ...] | None:
    """The JSON schemas of imported tools (None for none), or an error naming `key`."""
    try:
        return tuple(tool_schema(fn) for fn in tools) or None
    except ValueError as err:
        raise EnvConfigError(f"{key}: {err}") from None


def tool_schemas(names: list[str], key: str) -> tuple[dict, ...] | None:
    """The JSON schemas of 'module:function' tools (None for none), or an error naming `key`."""
    return schemas_of(import_tools(names, key), key)


def environment_factory(cfg) -> tuple[Callable[[], Environment], list[dict] | None]:
    """(a function building one episode's environment, the tools' JSON schemas for the chat
    template or None) for a roles.rollout.environment section (rlhf.config.EnvironmentConfig)."""
    key = "roles.rollout.environment"
    tools = import_tools(cfg.tools, f"{key}.tools")
    schemas = schemas_of(tools, f"{key}.tools")
    schemas = list(schemas) if schemas else None
    if cfg.name == "single_turn":
        return SingleTurn, None
    if cfg.name == "tools":
        cls = ToolEnv
        parser = {"hermes": parse_tool_calls}[cfg.parser]
        kwargs = {
            "tools": tools,
            "timeout_s": cfg.tool_timeout_s,
            "max_calls_per_turn": cfg.max_calls_per_turn,
            "parser": parser,
            **cfg.args,
        }
    else:
        cls = import_object(cfg.name, f"{key}.name", EnvConfigError)
        kwargs = dict(cfg.args, **({"tools": tools} if tools else {}))
    try:
        cls(**kwargs)  # built once here, so a wrong argument is said before any episode
    except TypeError as err:
        raise EnvConfigError(f"{key}.args do not fit {cfg.name}: {err}") from None
    return (lambda: cls(**kwargs)), schemas
