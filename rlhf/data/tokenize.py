"""Turn validated rows into token ids with prompt/response masks.

Prompt and response are tokenised separately and concatenated (as TRL does for preference
data): the prompt ids a model is trained on are then exactly the ids it is given at
generation time. Conversations are rendered with the tokenizer's chat template, the prompt
with the generation prompt; the response is the rest of the rendered conversation.
Plain-text responses get EOS appended; chat-rendered ones already end with the template's
end-of-turn marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.data.formats import (
    ClassificationRow,
    Messages,
    PreferenceRow,
    PromptRow,
    SFTRow,
    Text,
    UnpairedRow,
    is_conversation,
)
from rlhf.data.quarantine import DataError, RowError


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int
    prompt_limit: int
    truncation_mode: str = "keep_end"
    completion_only_loss: bool = True
    tools: tuple[dict, ...] | None = None
    """JSON schemas of tools the chat template renders into every conversation (data.tools)."""


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class PreferenceFeatures:
    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class SFTFeatures:
    index: int
    input_ids: list[int]
    loss_mask: list[bool]


@dataclass(frozen=True)
class PromptFeatures:
    index: int
    prompt_ids: list[int]
    prompt_text: str
    fields: dict = field(default_factory=dict)
    """The row's other fields (PromptRow.fields), for the reward and the logs."""
    prompt: Text | None = None
    """The row's prompt as given (text or messages): where a multi-turn episode starts."""


@dataclass(frozen=True)
class UnpairedFeatures:
    index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool


@dataclass(frozen=True)
class ClassificationFeatures:
    index: int
    input_ids: list[int]
    label: int


# ----------------------------------------------------------------------------- rendering


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise DataError(
            f"{where} is a chat conversation, but tokenizer {name!r} has no chat template. "
            "Fix: set model.chat_template to a Jinja template (or a path to a .jinja file), "
            "use a model that ships one (e.g. an -Instruct model), or give plain strings."
        )


def _render(tokenizer, messages: Messages, generation_prompt: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(
        list(messages),
        tools=list(tools) if tools else None,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def render_prompt(tokenizer, prompt: Text, tools=None) -> str:
    return _render(tokenizer, prompt, True, tools) if is_conversation(prompt) else prompt


def render_response(tokenizer, prompt: Messages, response: Messages, field: str, tools=None) -> str:
    """The text the template adds for `response` after the rendered prompt."""
    prompt_text = _render(tokenizer, prompt, True, tools)
    full = _render(tokenizer, tuple(prompt) + tuple(response), False, tools)
    if not full.startswith(prompt_text):
        raise RowError(
            field,
            "the chat template does not render the prompt as a prefix of the full conversation",
        )
    return full[len(prompt_text) :]


def conversation_segments(tokenizer, messages: Messages, tools=None) -> list[tuple[str, bool]]:
    """(text, is_assistant) pieces whose concatenation is the rendered conversation."""
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, tools)
        upto = _render(tokenizer, messages[: i + 1], False, tools)
        if not (before.startswith(done) and upto.startswith(before)):
            raise RowError(
                "messages", "the chat template does not render each turn as a prefix of the next"
            )
        segments += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    rest = _render(tokenizer, messages, False, tools)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [s for s in segments if s[0]]


# ----------------------------------------------------------------------------- token ids


class Tokenizer:
    """The tokenizer plus the few rules every format shares (BOS, EOS, truncation)."""

    def __init__(self, tokenizer, settings: TokenizeSettings):
        self.tok, self.settings = tokenizer, settings
        #: Fields of the current row cut to fit (the pipeline counts them per usable row).
        self.truncated: set[str] = set()
        self.bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError(
                f"tokenizer {tokenizer.name_or_path!r} has no EOS token: set one before training"
            )

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: Text) -> list[int]:
        ids = self.ids(render_prompt(self.tok, prompt, self.settings.tools))
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return self.truncate_prompt(ids)

    def response_ids(self, prompt: Text, response: Text, field: str) -> list[int]:
        if is_conversation(response):
            return self.ids(render_response(self.tok, prompt, response, field, self.settings.tools))
        return [*self.ids(response), self.eos]

    def truncate_prompt(self, ids: list[int]) -> list[int]:
        limit, mode = self.settings.prompt_limit, self.settings.truncation_mode
        if len(ids) <= limit:
            return ids
        if mode == "drop":
            raise RowError(
                "prompt", f"prompt has {len(ids)} tokens, more than data.max_prompt_length={limit}"
            )
        self.truncated.add("prompt")
        if mode == "keep_start":
            return ids[:limit]
        keep_bos = self.bos is not None and ids[0] == self.bos
        return [self.bos, *ids[len(ids) - limit + 1 :]] if keep_bos else ids[len(ids) - limit :]

    def fit_response(self, prompt_ids: list[int], ids: list[int], field: str) -> list[int]:
        room = self.settings.max_length - len(prompt_ids)
        if room < 1:
            raise RowError(
                field,
                f"the prompt's {len(prompt_ids)} tokens leave no room for a response under data.max_length={self.settings.max_length}",
            )
        if len(ids) > room:
            self.truncated.add(field)
        return ids[:room]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text (Llama does, GPT-2 does not)."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


# ----------------------------------------------------------------------------- per format


def preference_features(t: Tokenizer, row: PreferenceRow, index: int) -> PreferenceFeatures:
    prompt_ids = t.prompt_ids(row.prompt)
    chosen = t.fit_response(prompt_ids, t.response_ids(row.prompt, row.chosen, "chosen"), "chosen")
    rejected = t.fit_response(
        prompt_ids, t.response_ids(row.prompt, row.rejected, "rejected"), "rejected"
    )
    if chosen == rejected:
        raise RowError(
            "rejected",
            f"chosen and rejected are identical after truncation to data.max_length={t.settings.max_length}",
        )
    return PreferenceFeatures(index, prompt_ids, chosen, rejected)


def sft_features(t: Tokenizer, row: SFTRow, index: int) -> SFTFeatures:
    if row.messages is not None:
        segments = conversation_segments(t.tok, row.messages, t.settings.tools)
        ids, mask = [], []
        for text, trained in segments:
            piece = t.ids(text)
            ids += piece
            mask += [trained] * len(piece)
        if t.bos is not None and ids and ids[0] != t.bos:
            ids, mask = [t.bos, *ids], [False, *mask]
    else:
        prompt_ids = (
            t.prompt_ids(row.prompt) if row.prompt else ([t.bos] if t.bos is not None else [])
        )
        completion = t.response_ids(row.prompt, row.completion, "completion")
        ids = prompt_ids + completion
        mask = [False] * len(prompt_ids) + [True] * len(completion)
    if not t.settings.completion_only_loss:
        mask = [True] * len(ids)
    if len(ids) > t.settings.max_length:
        t.truncated.add("completion" if row.messages is None else "messages")
    ids, mask = ids[: t.settings.max_length], mask[: t.settings.max_length]
    if not any(mask[1:]):
        raise RowError(
            "completion" if row.messages is None else "messages",
            f"no trained tokens left after truncation to data.max_length={t.settings.max_length}",
        )
    return SFTFeatures(index, ids, mask)


def prompt_features(t: Tokenizer, row: PromptRow, index: int) -> PromptFeatures:
    return PromptFeatures(
        index,
        t.prompt_ids(row.prompt),
        render_prompt(t.tok, row.prompt, t.settings.tools),
        row.fields,
        row.prompt,
    )


def unpaired_features(t: Tokenizer, row: UnpairedRow, index: int) -> UnpairedFeatures:
    prompt_ids = t.prompt_ids(row.prompt)
    completion = t.fit_response(
        prompt_ids, t.response_ids(row.prompt, row.completion, "completion"), "completion"
    )
    return UnpairedFeatures(index, prompt_ids, completion, row.desirable)


def classification_features(
    t: Tokenizer, row: ClassificationRow, index: int
) -> ClassificationFeatures:
    # Classifiers (BERT-style reward models) need their own special tokens ([CLS] ... [SEP]).
    full = t.tok(row.text, add_special_tokens=True)["input_ids"]
    ids = full
    if len(full) > t.settings.max_length:
        t.truncated.add("text")
        ids = t.tok(
            row.text, add_special_tokens=True, truncation=True, max_length=t.settings.max_length
        )["input_ids"]
    return ClassificationFeatures(index, ids, row.label)


FEATURIZERS = {
    "preference": preference_features,
    "sft": sft_features,
    "prompt": prompt_features,
    "unpaired": unpaired_features,
    "classification": classification_features,
}
