"""builtin:arithmetic — single-digit addition and multiplication problems with their answers,
generated offline and deterministically: the reasoning demo's task (`rlhf quickstart --task
reasoning`). SmolLM2-135M-Instruct answers about a quarter of them right when it samples at
temperature 1, but about two thirds greedily, so RL with a verifiable reward has something
to sharpen.

Rows are {prompt, answer}; the held-out split (test) is a fixed fifth of the problems, never
seen in train.
"""

from __future__ import annotations

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
