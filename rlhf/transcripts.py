"""Token-exact multi-turn transcripts (pure: no Ray).

The tokens trained on must be the tokens the model generated. Decoding a turn and re-encoding
the whole conversation between turns drifts (a different merge of the same text, a space the
template trims, a special token spelled out): the loss then trains on sequences the model
never produced (veRL #3720, #6719). So a transcript keeps every assistant turn's ids as
generated, and appends for each environment turn only the ids its chat template adds: the
template's text after an assistant turn's end-of-turn token, the environment's messages and
the next generation prompt. The loss mask covers the model's ids only, and the engine's
log-prob of each generated id sits at its position.

`retokenize_mismatch` compares the assembled ids with a re-encoding of the whole transcript
(decoded messages through the chat template), so drift is counted, not silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: A stand-in conversation: the template's rendering of the turns after it must not depend on
#: its text (true of ChatML, Llama-3, Qwen2.5, SmolLM2 templates; checked when used).
_ANCHOR = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


class TemplateError(ValueError):
    """The chat template cannot extend a transcript token-exactly; the message says why."""


def render_ids(tokenizer, messages: list[dict], generation_prompt: bool, tools=None) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, add_generation_prompt=generation_prompt
    )
    # transformers 5 returns a BatchEncoding for tokenize=True
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def environment_turn_ids(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """The ids the chat template puts after an assistant turn that ended with its end-of-turn
    token, for the environment's `messages` and the next assistant turn's generation prompt."""
    eos = tokenizer.eos_token_id
    before = render_ids(tokenizer, _ANCHOR, False, tools)
    after = render_ids(tokenizer, _ANCHOR + list(messages), True, tools)
    if after[: len(before)] != before:
        raise TemplateError(
            "the chat template renders a conversation differently once more turns follow "
            "(it rewrites earlier turns): multi-turn transcripts cannot be token-exact with it; "
            "set model.chat_template to one that only appends"
        )
    if eos not in before:
        raise TemplateError(
            f"the chat template does not end an assistant turn with the EOS token "
            f"{tokenizer.eos_token!r}: the engine would not stop at the turn's end"
        )
    last_eos = len(before) - 1 - before[::-1].index(eos)
    return before[last_eos + 1 :] + after[len(before) :]


@dataclass
class Transcript:
    """One episode as the trainer sees it: ids [prompt, turn 1, env 1, turn 2, …], the loss
    mask (True on generated ids only), the engine's log-probs (0 elsewhere), and the
    conversation as messages (each assistant turn decoded) for the environment and the check."""

    ids: list[int]
    mask: list[bool]
    logps: list[float]
    messages: list[dict]
    turns: int = 0
    truncated: bool = False
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) of each assistant turn's ids in `ids`."""

    @property
    def prompt_length(self) -> int:
        return self.turn_spans[0][0] if self.turn_spans else len(self.ids)


def start(tokenizer, messages: list[dict], tools=None) -> Transcript:
    """The transcript of an episode's first messages, up to the first generation prompt."""
    ids = render_ids(tokenizer, messages, True, tools)
    return Transcript(ids, [False] * len(ids), [0.0] * len(ids), [dict(m) for m in messages])


def add_turn(
    t: Transcript, tokenizer, generated: list[int], logps: list[float], finished: bool
) -> str:
    """Append an assistant turn as generated (ids, the engine's log-prob of each, whether it
    ended with EOS); returns its text (special tokens dropped) for the environment."""
    if len(generated) != len(logps):
        raise ValueError(f"{len(generated)} generated ids but {len(logps)} log-probs")
    t.turn_spans.append((len(t.ids), len(t.ids) + len(generated)))
    t.ids += generated
    t.mask += [True] * len(generated)
    t.logps += [float(x) for x in logps]
    t.turns += 1
    t.truncated = not finished
    text = tokenizer.decode(generated, skip_special_tokens=True)
    t.messages.append({"role": "assistant", "content": text})
    return text


def add_environment(t: Transcript, tokenizer, messages: list[dict], tools=None) -> None:
    """Append the environment's messages and the next generation prompt (template ids only:
    never trained on)."""
    extra = environment_turn_ids(tokenizer, messages, tools)
    t.ids += extra
    t.mask += [False] * len(extra)
    t.logps += [0.0] * len(extra)
    t.messages += [dict(m) for m in messages]


def retokenize_mismatch(t: Transcript, tokenizer, tools=None, after: int = 0) -> int | None:
    """The first position where the assembled ids differ from a re-encoding of the decoded
    conversation through the chat template, or None when they agree (no drift). The
    re-encoding may go on past the assembled ids (the template closes a last assistant turn
    the model cut short): only the assembled length is compared. `after`: compare from that
    position on only (the prompt's ids came from elsewhere, e.g. the data pipeline, which
    renders a plain-text prompt without the template): the re-encoding's part after the
    prompt's messages. Without a chat template there is nothing to compare with: None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    generation_prompt = bool(t.messages) and t.messages[-1]["role"] != "assistant"
    again = render_ids(tokenizer, t.messages, generation_prompt, tools)
    if after:
        first = next(
            (i for i, m in enumerate(t.messages) if m["role"] == "assistant"), len(t.messages)
        )
        head = render_ids(tokenizer, t.messages[:first], True, tools)
        again = again[len(head) :]
    ids = t.ids[after:]
    for i, (a, b) in enumerate(zip(ids, again, strict=False)):
        if a != b:
            return after + i
    return None if len(again) >= len(ids) else after + len(again)
