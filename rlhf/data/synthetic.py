"""builtin:reviews — a small synthetic movie-review set generated offline and deterministically.

No real preference dataset ships in any package, so the quickstart and the tests use this:
each row has a prompt asking about a (made-up) film and a positive and a negative review of
it. Positive is preferred, which a tiny model can learn and a sentiment lexicon can score.
The test split uses films that never appear in train.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from rlhf.data.arithmetic import arithmetic, arithmetic_preset, calculator_preset, calculator_rows
from rlhf.data.quarantine import DataError

_FIRST = [
    "The Silent",
    "A Distant",
    "The Last",
    "Golden",
    "Midnight",
    "The Broken",
    "Crimson",
    "The Hidden",
    "Winter",
    "The Lost",
    "Electric",
    "The Paper",
    "Velvet",
    "The Iron",
    "Quiet",
    "The Glass",
]
_SECOND = [
    "Harbor",
    "Garden",
    "River",
    "Empire",
    "Letters",
    "Machine",
    "Season",
    "Frontier",
    "Voyage",
    "Kingdom",
]
_ASPECTS = [
    "acting",
    "story",
    "music",
    "dialogue",
    "ending",
    "cast",
    "script",
    "camera work",
    "pacing",
    "characters",
]
_POSITIVE = [
    "wonderful",
    "brilliant",
    "beautiful",
    "moving",
    "delightful",
    "superb",
    "charming",
    "splendid",
    "great",
    "lovely",
    "gripping",
    "fantastic",
]
_NEGATIVE = [
    "terrible",
    "boring",
    "dull",
    "painful",
    "horrible",
    "weak",
    "bad",
    "disappointing",
    "tedious",
    "dreadful",
    "clumsy",
    "poor",
]
_PROMPTS = [
    "Write a short review of {m}.",
    "What did you think of {m}?",
    "Give your opinion of the film {m}.",
    "Review the movie {m}.",
]
_POS_TEMPLATES = [
    "{m} is a {a} film. The {x} was {b} and I loved it.",
    "I loved {m}. The {x} is {a} and the {y} is {b}.",
    "What a {a} movie, with {b} {x}. I would happily watch {m} again.",
]
_NEG_TEMPLATES = [
    "{m} is a {a} film. The {x} was {b} and I hated it.",
    "I hated {m}. The {x} is {a} and the {y} is {b}.",
    "What a {a} movie, with {b} {x}. I would never watch {m} again.",
]

MOVIES = [f"{a} {b}" for a in _FIRST for b in _SECOND]
#: Films of the test split; train never sees them.
TEST_MOVIES = frozenset(MOVIES[::8])
SPLIT_SIZES = {"train": 512, "test": 128}


def _review(rng: random.Random, movie: str, templates: list[str], words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    x, y = rng.sample(_ASPECTS, 2)
    return rng.choice(templates).format(m=movie, a=a, b=b, x=x, y=y)


def reviews(split: str) -> Iterator[dict[str, Any]]:
    """Rows {prompt, positive, negative} for split train or test."""
    if split not in SPLIT_SIZES:
        raise DataError(f"builtin:reviews has splits {sorted(SPLIT_SIZES)}, not {split!r}")
    movies = [m for m in MOVIES if (m in TEST_MOVIES) == (split == "test")]
    rng = random.Random(f"reviews/{split}")
    for _ in range(SPLIT_SIZES[split]):
        movie = rng.choice(movies)
        yield {
            "prompt": rng.choice(_PROMPTS).format(m=movie),
            "positive": _review(rng, movie, _POS_TEMPLATES, _POSITIVE),
            "negative": _review(rng, movie, _NEG_TEMPLATES, _NEGATIVE),
        }


def reviews_preset(row: dict[str, Any], fmt: str, index: int) -> dict[str, Any]:
    """builtin:reviews rows in each format: positive is chosen / desirable / label 1; SFT and
    KTO alternate positive and negative reviews (a mixed-sentiment starting point for RL)."""
    positive = index % 2 == 0
    review = row["positive"] if positive else row["negative"]
    if fmt == "preference":
        return {"prompt": row["prompt"], "chosen": row["positive"], "rejected": row["negative"]}
    if fmt == "sft":
        return {"prompt": row["prompt"], "completion": review}
    if fmt == "prompt":
        return {"prompt": row["prompt"]}
    if fmt == "unpaired":
        return {"prompt": row["prompt"], "completion": review, "label": positive}
    return {"text": review, "label": int(positive)}


#: builtin:<name> -> (rows of a split, the row mapping per format).
BUILTINS = {
    "reviews": (reviews, reviews_preset),
    "arithmetic": (arithmetic, arithmetic_preset),
    "calculator": (calculator_rows, calculator_preset),
}


def builtin_rows(name: str, split: str) -> Iterator[dict[str, Any]]:
    if name not in BUILTINS:
        raise DataError(
            f"unknown builtin dataset builtin:{name} (have {', '.join('builtin:' + n for n in BUILTINS)})"
        )
    return BUILTINS[name][0](split)


def builtin_preset(path: str):
    """The row mapping of a builtin dataset path, or None for any other path."""
    if path.startswith("builtin:"):
        entry = BUILTINS.get(path[len("builtin:") :])
        return entry[1] if entry else None
    return None


def corpus() -> Iterator[str]:
    """Every text of every builtin set (the tiny tokenizer is trained on these)."""
    for split in SPLIT_SIZES:
        for row in reviews(split):
            yield from row.values()
