"""Row formats and their validation.

Each format accepts a few key sets (its variants); a row is checked for missing and unexpected
keys, value types, empty strings and format-specific mistakes, and is normalised to a typed
row. Values are plain strings or chat message lists ([{role, content}, ...]); the latter are
rendered with the tokenizer's chat template later (rlhf.data.tokenize).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rlhf.data.quarantine import RowError

Messages = tuple[dict[str, str], ...]
Text = str | Messages

#: Accepted key sets per format, in order of preference.
FORMAT_KEYS: dict[str, list[tuple[str, ...]]] = {
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "sft": [("prompt", "completion"), ("messages",), ("text",)],
    "prompt": [("prompt",), ("messages",)],
    "unpaired": [("prompt", "completion", "label")],
    "classification": [("text", "label")],
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PreferenceRow:
    prompt: Text
    chosen: Text
    rejected: Text


@dataclass(frozen=True)
class SFTRow:
    """Either `messages` (a conversation) or `prompt` + `completion` (prompt may be '')."""

    prompt: Text = ""
    completion: str = ""
    messages: Messages | None = None


@dataclass(frozen=True)
class PromptRow:
    """A prompt, and the row's other fields (ground truth such as `answer` or `tests`,
    metadata): they travel untouched with each sample to the reward and the logs."""

    prompt: Text
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class UnpairedRow:
    prompt: Text
    completion: Text
    desirable: bool


@dataclass(frozen=True)
class ClassificationRow:
    text: str
    label: int


TypedRow = PreferenceRow | SFTRow | PromptRow | UnpairedRow | ClassificationRow


def is_conversation(value: Any) -> bool:
    return isinstance(value, tuple | list)


def check_text(field: str, value: Any, allow_messages: bool = True) -> Text:
    """A non-empty string, or a valid message list (returned as a tuple)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty string" if not value else "string holds only whitespace")
        return value
    if allow_messages and isinstance(value, list | tuple):
        return check_messages(field, value)
    expected = "a string or a list of chat messages" if allow_messages else "a string"
    got = "null" if value is None else type(value).__name__
    raise RowError(field, f"expected {expected}, got {got}")


def check_messages(field: str, value: list | tuple) -> Messages:
    if not value:
        raise RowError(field, "empty message list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(field, f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowError(
                field, f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise RowError(
                field, f"message {i} content must be a string, got {type(content).__name__}"
            )
        if not content.strip():
            raise RowError(field, f"message {i} ({role}) has empty content")
        out.append(dict(message))
    return tuple(out)


def pick_variant(row: dict[str, Any], fmt: str, extra_ok: bool = False) -> tuple[str, ...]:
    """The key set this row uses; raises naming the missing or the unexpected key (`extra_ok`:
    keys of no variant of the format are allowed)."""
    variants = FORMAT_KEYS[fmt]
    usable = [v for v in variants if all(k in row for k in v)]
    if not usable:
        best = max(variants, key=lambda v: sum(k in row for k in v))
        missing = next(k for k in best if k not in row)
        accepted = " | ".join("{" + ", ".join(v) + "}" for v in variants)
        raise RowError(
            missing,
            f"missing key {missing!r} (format {fmt} takes {accepted}; map columns with data.train.columns)",
        )
    variant = max(usable, key=len)
    extra = [k for k in row if k not in variant]
    if extra_ok:
        extra = [k for k in extra if any(k in v for v in variants)]
    if extra:
        raise RowError(
            extra[0],
            f"unexpected key {extra[0]!r} for format {fmt} (keys {', '.join(variant)}); "
            "drop it with data.train.ignore_columns or map it with data.train.columns",
        )
    return variant


def split_common_prefix(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Implicit prompt: the shared beginning of chosen and rejected.

    Conversations share whole leading messages. Strings share a character prefix, cut back to
    just after the last whitespace inside it so that no word is split between prompt and
    response.
    """
    if is_conversation(chosen) and is_conversation(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return tuple(chosen[:n]), tuple(chosen[n:]), tuple(rejected[n:])
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n < len(chosen) and n < len(rejected):
            cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
            n = cut + 1
        return chosen[:n], chosen[n:], rejected[n:]
    raise RowError("rejected", "chosen and rejected must both be strings or both message lists")


def _check_same_style(prompt: Text, **responses: Text) -> None:
    for field, value in responses.items():
        if is_conversation(prompt) != is_conversation(value):
            raise RowError(
                field,
                f"prompt is {_style(prompt)} but {field} is {_style(value)}: use one style per row",
            )


def _style(value: Text) -> str:
    return "a message list" if is_conversation(value) else "a string"


def _check_responses(field: str, value: Text) -> None:
    if is_conversation(value) and value[0]["role"] != "assistant":
        raise RowError(
            field, f"{field} must start with an assistant message, got role {value[0]['role']!r}"
        )


def validate_preference(row: dict[str, Any]) -> PreferenceRow:
    variant = pick_variant(row, "preference")
    chosen, rejected = check_text("chosen", row["chosen"]), check_text("rejected", row["rejected"])
    if chosen == rejected:
        raise RowError("rejected", "chosen and rejected are identical")
    if "prompt" in variant:
        prompt = check_text("prompt", row["prompt"])
    else:
        prompt, chosen, rejected = split_common_prefix(chosen, rejected)
        if not prompt:
            raise RowError(
                "chosen",
                "chosen and rejected share no leading prompt: give the prompt in a 'prompt' column",
            )
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not value or (isinstance(value, str) and not value.strip()):
                raise RowError(
                    field, f"{field} is only the shared prompt: it has no response of its own"
                )
    _check_same_style(prompt, chosen=chosen, rejected=rejected)
    _check_responses("chosen", chosen)
    _check_responses("rejected", rejected)
    return PreferenceRow(prompt, chosen, rejected)


def validate_sft(row: dict[str, Any]) -> SFTRow:
    variant = pick_variant(row, "sft")
    if variant == ("text",):
        return SFTRow(prompt="", completion=check_text("text", row["text"], allow_messages=False))
    if variant == ("messages",):
        messages = check_text("messages", row["messages"])
        if not is_conversation(messages):
            raise RowError(
                "messages",
                "expected a list of chat messages, got a string (use a 'text' column for plain text)",
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("messages", "conversation has no assistant message to train on")
        return SFTRow(messages=messages)
    prompt, completion = (
        check_text("prompt", row["prompt"]),
        check_text("completion", row["completion"]),
    )
    _check_same_style(prompt, completion=completion)
    if is_conversation(prompt):
        _check_responses("completion", completion)
        return SFTRow(messages=tuple(prompt) + tuple(completion))
    return SFTRow(prompt=prompt, completion=completion)


def validate_prompt(row: dict[str, Any], required: tuple[str, ...] = ()) -> PromptRow:
    """A prompt (or messages) and any other fields; `required`: the fields the reward reads."""
    variant = pick_variant(row, "prompt", extra_ok=True)
    fields = {k: v for k, v in row.items() if k not in variant}
    for name in required:
        if fields.get(name) is None:
            got = "missing" if name not in fields else "null"
            raise RowError(
                name,
                f"field {name!r} is {got}, and the reward (roles.reward) reads it: give every "
                f"prompt row a {name!r} (or map a column to it with data.train.columns)",
            )
    return PromptRow(check_text(variant[0], row[variant[0]]), fields)


def validate_unpaired(row: dict[str, Any]) -> UnpairedRow:
    pick_variant(row, "unpaired")
    prompt, completion = (
        check_text("prompt", row["prompt"]),
        check_text("completion", row["completion"]),
    )
    _check_same_style(prompt, completion=completion)
    _check_responses("completion", completion)
    return UnpairedRow(prompt, completion, _as_bool("label", row["label"]))


def _as_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(field, f"expected true/false (or 1/0), got {value!r}")


def validate_classification(row: dict[str, Any], num_labels: int) -> ClassificationRow:
    pick_variant(row, "classification")
    text = check_text("text", row["text"], allow_messages=False)
    label = row["label"]
    if (
        isinstance(label, bool)
        or (isinstance(label, str) and label.strip().lstrip("-").isdigit())
        or (isinstance(label, float) and label.is_integer())
    ):
        label = int(label)
    if not isinstance(label, int):
        raise RowError("label", f"expected an integer class id, got {label!r}")
    if not 0 <= label < max(num_labels, 2):
        raise RowError(
            "label",
            f"label {label} is outside [0, {max(num_labels, 2) - 1}] (data.num_labels={num_labels})",
        )
    return ClassificationRow(text, label)


def validate(
    row: dict[str, Any], fmt: str, num_labels: int = 2, required: tuple[str, ...] = ()
) -> TypedRow:
    """Validate one row (after presets and column mapping) for a format; `required`: fields a
    prompt row must carry for the reward."""
    if fmt == "classification":
        return validate_classification(row, num_labels)
    if fmt == "prompt":
        return validate_prompt(row, required)
    return _VALIDATORS[fmt](row)


#: The formats whose validator takes the row alone (classification and prompt rows take more).
_VALIDATORS = {
    "preference": validate_preference,
    "sft": validate_sft,
    "unpaired": validate_unpaired,
}
