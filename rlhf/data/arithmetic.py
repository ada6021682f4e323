"""builtin:arithmetic — single-digit addition and multiplication problems with their answers,
generated offline and deterministically: the reasoning demo's task (`rlhf quickstart --task
reasoning`). SmolLM2-135M-Instruct answers about a quarter of them right when it samples at
temperature 1, but about two thirds greedily, so RL with a verifiable reward has something
to sharpen.

Rows are {prompt, answer}; the held-out split (test) is a fixed fifth of the problems, never
seen in train.

builtin:calculator — products of two-digit numbers, for tool use (the calculator recipe):
prompt rows {prompt, answer, a, b}, and SFT rows that are whole tool-use transcripts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

from rlhf.data.quarantine import DataError

#: The instruction after each question.
INSTRUCTION = "Answer with just the number."


def problems() -> list[tuple[str, int]]:
    """Every problem once: a + b for a, b in 0..9, and a * b for a, b in 2..9 (164)."""
    out = [(f"What is {a} + {b}?", a + b) for a in range(10) for b in range(10)]
    out += [(f"What is {a} * {b}?", a * b) for a in range(2, 10) for b in range(2, 10)]
    return out


def split_of(index: int) -> str:
    """test for a fixed fifth of the problems (seeded), train for the rest."""
    return "test" if random.Random(f"arithmetic/{index}").random() < 0.2 else "train"


def arithmetic(split: str) -> Iterator[dict[str, Any]]:
    """Rows {prompt, answer} of split train or test, in a seeded order."""
    if split not in ("train", "test"):
        raise DataError(f"builtin:arithmetic has splits ['test', 'train'], not {split!r}")
    rows = [
        {"prompt": f"{question} {INSTRUCTION}", "answer": str(answer)}
        for i, (question, answer) in enumerate(problems())
        if split_of(i) == split
    ]
    random.Random(f"arithmetic/{split}/order").shuffle(rows)
    yield from rows


def arithmetic_preset(row: dict[str, Any], fmt: str, index: int) -> dict[str, Any]:
    """Prompt rows carry their answer; SFT rows answer with the number."""
    if fmt == "prompt":
        return row
    if fmt == "sft":
        return {"prompt": row["prompt"], "completion": row["answer"]}
    raise DataError(f"builtin:arithmetic gives prompt or sft rows, not {fmt}")


# ----------------------------------------------------------------------------- builtin:calculator

#: The calculator task's question: two-digit products, beyond what a small model computes in
#: its head (SmolLM2-135M-Instruct: none of 64 samples right), trivial with the tool.
CALCULATOR_QUESTION = "What is {a} * {b}? Use the calculator, then answer with just the number."

#: builtin:calculator's problems per split (seeded, disjoint).
CALCULATOR_SIZES = {"train": 200, "test": 48}


def calculator_problems() -> dict[str, list[tuple[int, int]]]:
    """Distinct products a * b of two-digit numbers (11..99), seeded, split train / test."""
    pairs = [(a, b) for a in range(11, 100) for b in range(11, 100)]
    random.Random("calculator/pairs").shuffle(pairs)
    train = CALCULATOR_SIZES["train"]
    return {"train": pairs[:train], "test": pairs[train : train + CALCULATOR_SIZES["test"]]}


def calculator_call(expression: str) -> str:
    """An assistant turn calling rlhf.tools:calculator, in the Hermes format."""
    body = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return f"<tool_call>\n{body}\n</tool_call>"


def calculator_rows(split: str) -> Iterator[dict[str, Any]]:
    """Rows {prompt, answer, a, b} of split train or test."""
    if split not in CALCULATOR_SIZES:
        raise DataError(f"builtin:calculator has splits ['test', 'train'], not {split!r}")
    for a, b in calculator_problems()[split]:
        yield {"prompt": CALCULATOR_QUESTION.format(a=a, b=b), "answer": str(a * b), "a": a, "b": b}


def calculator_preset(row: dict[str, Any], fmt: str, index: int) -> dict[str, Any]:
    """Prompt rows carry their answer; SFT rows are the whole tool-use transcript: the call,
    the tool's result and the answer (the assistant turns are trained)."""
    if fmt == "prompt":
        return row
    if fmt == "sft":
        expression = f"{row['a']} * {row['b']}"
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": calculator_call(expression)},
                {"role": "tool", "content": row["answer"]},
                {"role": "assistant", "content": row["answer"]},
            ]
        }
    raise DataError(f"builtin:calculator gives prompt or sft rows, not {fmt}")
