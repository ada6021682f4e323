"""Column mappings for the datasets of the seeds' workflows, tested on local files of the same
schema. A preset maps one raw row to the project's format for the run's row format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhf.data.quarantine import RowError

Row = dict[str, Any]


def _need(row: Row, *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in row]
    if missing:
        raise RowError(
            missing[0], f"missing column {missing[0]!r} of this preset's schema ({', '.join(keys)})"
        )
    return [row[k] for k in keys]


def _text_prompt(text: Any, index: int, lo: int = 2, hi: int = 8) -> str:
    """The first k words of a text as a prompt, k in [lo, hi] varying with the row (as the
    classic positive-review PPO experiment samples query lengths)."""
    words = str(text).split()
    k = lo + index % (hi - lo + 1)
    return " ".join(words[:k])


def stack_exchange_paired(row: Row, fmt: str, index: int) -> Row:
    """lvwerra/stack-exchange-paired: response_j is preferred over response_k."""
    question, better, worse = _need(row, "question", "response_j", "response_k")
    prompt = "Question: " + str(question) + "\n\nAnswer: "
    if fmt == "sft":
        return {"prompt": prompt, "completion": better}
    if fmt == "prompt":
        return {"prompt": prompt}
    return {"prompt": prompt, "chosen": better, "rejected": worse}


def ultrafeedback_binarized(row: Row, fmt: str, index: int) -> Row:
    """HuggingFaceH4/ultrafeedback_binarized: chosen/rejected are whole conversations (user
    turn included), so the prompt is their common leading messages."""
    if fmt == "sft":
        (messages,) = _need(row, "messages") if "messages" in row else _need(row, "chosen")
        return {"messages": messages}
    if fmt == "prompt":
        (prompt,) = _need(row, "prompt")
        return {"prompt": [{"role": "user", "content": prompt}]}
    chosen, rejected = _need(row, "chosen", "rejected")
    return {"chosen": chosen, "rejected": rejected}


MARC_LABELS = {"positive": 1, "negative": 0}


def marc_ja(row: Row, fmt: str, index: int) -> Row:
    """MARC-ja (JGLUE): `sentence` with label positive/negative. Labels map to 1 = positive,
    0 = negative; integer labels follow JGLUE's class order (0 = positive, 1 = negative)."""
    (sentence,) = _need(row, "sentence")
    if fmt == "prompt":
        return {"prompt": str(sentence)[: 10 + index % 6]}
    if fmt == "sft":
        return {"text": sentence}
    (label,) = _need(row, "label")
    if isinstance(label, str) and label in MARC_LABELS:
        label = MARC_LABELS[label]
    elif isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = 1 - label
    else:
        raise RowError(
            "label", f"MARC-ja label must be 'positive', 'negative', 0 or 1, got {label!r}"
        )
    return {"text": sentence, "label": label}


def imdb(row: Row, fmt: str, index: int) -> Row:
    """stanfordnlp/imdb: `text` with label 0 = negative, 1 = positive. As prompts, the first
    2-8 words of each review (the classic positive-review PPO experiment)."""
    (text,) = _need(row, "text")
    if fmt == "prompt":
        return {"prompt": _text_prompt(text, index)}
    if fmt == "sft":
        return {"text": text}
    (label,) = _need(row, "label")
    return {"text": text, "label": label}


#: The instruction appended to math problems (the Qwen2.5-Math / DeepSeek-R1 evaluation prompt):
#: the final answer goes in \boxed{}, where roles.reward's math verifier looks first.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _math_row(problem: Any, answer: Any, solution: Any, fmt: str) -> Row:
    """A math problem as a chat prompt carrying its ground truth (`answer`), or for SFT the
    worked solution as the completion."""
    prompt = [{"role": "user", "content": f"{str(problem).strip()}\n{MATH_INSTRUCTION}"}]
    if fmt == "prompt":
        return {"prompt": prompt, "answer": str(answer).strip()}
    if fmt == "sft":
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": str(solution)}]}
    raise RowError("preset", f"math presets give prompt or sft rows, not {fmt}")


def gsm8k(row: Row, fmt: str, index: int) -> Row:
    """openai/gsm8k (main): `question`, and `answer` = the worked solution ending in
    '#### <number>'; the number (commas dropped) is the ground truth."""
    question, answer = _need(row, "question", "answer")
    _, sep, final = str(answer).rpartition("####")
    if not sep or not final.strip():
        raise RowError("answer", "GSM8K answer has no '#### <number>' line")
    return _math_row(question, final.strip().replace(",", ""), answer, fmt)


def math_problems(row: Row, fmt: str, index: int) -> Row:
    """MATH (hendrycks_math / EleutherAI/hendrycks_math: problem, solution, level, type) and
    MATH-500 (HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id):
    the ground truth is `answer` where the set has it, else the solution's last \boxed{}."""
    from rlhf.verifiers import extract_boxed

    problem, solution = _need(row, "problem", "solution")
    answer = row.get("answer") or extract_boxed(str(solution))
    if not answer:
        raise RowError("solution", "MATH solution has no \\boxed{} answer (and no 'answer' column)")
    return _math_row(problem, answer, solution, fmt)


def deepscaler(row: Row, fmt: str, index: int) -> Row:
    """agentica-org/DeepScaleR-Preview-Dataset and sets of its schema (problem, answer,
    solution)."""
    problem, answer = _need(row, "problem", "answer")
    return _math_row(problem, answer, row.get("solution", ""), fmt)


PRESETS: dict[str, Callable[[Row, str, int], Row]] = {
    "gsm8k": gsm8k,
    "math": math_problems,
    "deepscaler": deepscaler,
    "stack_exchange_paired": stack_exchange_paired,
    "ultrafeedback_binarized": ultrafeedback_binarized,
    "marc_ja": marc_ja,
    "imdb": imdb,
}

#: Hub split names of presets whose splits are not called train/test.
SPLIT_ALIASES: dict[str, dict[str, dict[str, str]]] = {
    "ultrafeedback_binarized": {
        "preference": {"train": "train_prefs", "test": "test_prefs"},
        "sft": {"train": "train_sft", "test": "test_sft"},
        "prompt": {"train": "train_gen", "test": "test_gen"},
    },
}


def hub_split(preset: str | None, fmt: str, split: str) -> str:
    """The real split name for `split` under a preset (train -> train_prefs for UltraFeedback)."""
    return SPLIT_ALIASES.get(preset or "", {}).get(fmt, {}).get(split, split)
