"""Verifiable rewards: a program checks a response against the ground truth its prompt row
carries (roles.reward.type: verifiable). Pure per-sample functions, run in a process pool by
the reward source (actors.reward.VerifiableScorer).

Each verifier gives a value in [0, 1] and a reason; a sample's reward is the weighted sum over
roles.reward.verifiers (e.g. math × 1 + format × 0.1). The first verifier is the accuracy one:
a sample is *correct* (pass@k, mean@k) when it gives 1.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlhf.logs import warn_once

log = logging.getLogger(__name__)

#: The format verifier's default: reasoning in <think> tags, then the answer in <answer> tags.
THINK_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    value: float
    reason: str


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_ = text.find("{", start)
    if open_ < 0:
        # "\boxed 5" (no braces): the next token
        rest = text[start:].split(None, 2)
        return rest[1] if len(rest) > 1 else None
    depth = 0
    for i in range(open_, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_ + 1 : i].strip()
    return None  # unbalanced: the response was cut inside the box


def last_number(text: str) -> str | None:
    """The last number in the text (integers, decimals, thousands separators, a/b), commas
    dropped; None if there is none."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, mode: str) -> str | None:
    """The final answer of a response. boxed: the last \\boxed{}; last_number: the last number;
    answer_tag: the last <answer>...</answer>; auto: boxed, else the answer tag, else the last
    number; none: the whole response, stripped."""
    if mode == "none":
        return text.strip()
    if mode == "boxed":
        return extract_boxed(text)
    if mode == "last_number":
        return last_number(text)
    if mode == "answer_tag":
        tags = _ANSWER_TAG.findall(text)
        return tags[-1].strip() if tags else None
    if mode == "auto":
        for how in ("boxed", "answer_tag", "last_number"):
            found = extract_answer(text, how)
            if found:
                return found
        return None
    raise ValueError(f"unknown answer extraction {mode!r}")


def _timeout(seconds: float) -> int | None:
    """math-verify bounds its parsing with SIGALRM, which works in a main thread only; off it
    (a verifier called from a thread) the bound is dropped, said once."""
    if threading.current_thread() is not threading.main_thread():
        warn_once(
            log,
            "math:unbounded",
            "verifiers: math runs outside a main thread here, so its timeout_s cannot be "
            "enforced (SIGALRM); set roles.reward.workers >= 1 to verify in processes",
        )
        return None
    return max(1, round(seconds))


def math_equal(predicted: str, gold: str, timeout_s: float = 5.0) -> Verdict:
    """Mathematical equivalence by math-verify (its LaTeX/expression parser on sympy): 0.5 =
    \\frac{1}{2}, 1,000 = 1000, x+1 = 1+x."""
    from math_verify import parse, verify

    t = _timeout(timeout_s)
    gold_parsed = parse(_as_math(gold), parsing_timeout=t)
    if not gold_parsed:
        return Verdict(0.0, f"ground truth {gold!r} does not parse as math")
    pred_parsed = parse(_as_math(predicted), parsing_timeout=t)
    if not pred_parsed:
        return Verdict(0.0, f"answer {predicted[:40]!r} does not parse as math")
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=t)
    return Verdict(1.0, "correct") if ok else Verdict(0.0, f"answer {predicted[:40]!r} is wrong")


def _as_math(text: str) -> str:
    text = str(text).strip()
    return text if text.startswith("$") or "\\boxed" in text else f"${text}$"


def normalise(text: str) -> str:
    return " ".join(str(text).split()).casefold().rstrip(".")


def check(verifier: Mapping[str, Any], response: str, fields: Mapping[str, Any]) -> Verdict:
    """One verifier (a roles.reward.verifiers entry as a dict) on one response."""
    kind = verifier["kind"]
    if kind in ("regex", "format"):
        pattern = verifier.get("pattern") or THINK_ANSWER
        match = re.fullmatch if kind == "format" else re.search
        ok = match(pattern, response, re.DOTALL) is not None
        return Verdict(1.0, "matches") if ok else Verdict(0.0, f"{kind} does not match")
    gold = fields[verifier["field"]]
    if kind == "code":
        from rlhf.sandbox import run_python

        blocks = _CODE_BLOCK.findall(response)
        code = blocks[-1] if blocks else response
        tests = "\n".join(gold) if isinstance(gold, list | tuple) else str(gold)
        result = run_python(
            code + "\n\n" + tests, timeout_s=verifier["timeout_s"], memory_mb=verifier["memory_mb"]
        )
        return Verdict(float(result.passed), "passed" if result.passed else result.reason)
    answer = extract_answer(response, verifier["extract"])
    if answer is None:
        return Verdict(0.0, f"no answer found ({verifier['extract']})")
    if kind == "exact":
        ok = normalise(answer) == normalise(gold)
        return Verdict(1.0, "correct") if ok else Verdict(0.0, f"answer {answer[:40]!r} is wrong")
    if kind == "math":
        return math_equal(answer, str(gold), verifier["timeout_s"])
    raise ValueError(f"unknown verifier kind {kind!r}")


def score_sample(
    verifiers: list[Mapping[str, Any]], response: str, fields: Mapping[str, Any]
) -> tuple[float, list[float], str]:
    """(weighted sum, each verifier's value, the reasons joined) of one response. A verifier
    that raises scores 0 with the error as its reason: one odd response never stops a run."""
    values, reasons = [], []
    for v in verifiers:
        try:
            verdict = check(v, response, fields)
        except Exception as err:  # a verifier bug or a pathological input: score 0, say why
            verdict = Verdict(0.0, f"{v['kind']} failed: {type(err).__name__}: {err}"[:200])
        values.append(verdict.value)
        reasons.append(f"{v['kind']}: {verdict.reason}")
    total = sum(float(v["weight"]) * x for v, x in zip(verifiers, values, strict=True))
    return total, values, "; ".join(reasons)


def score_chunk(
    verifiers: list[dict], responses: list[str], fields: list[dict]
) -> list[tuple[float, list[float], str]]:
    """score_sample over a chunk (what one pool task runs)."""
    return [score_sample(verifiers, r, f) for r, f in zip(responses, fields, strict=True)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (eq. 1): 1 - C(n-c, k) / C(n, k), for n samples of
    which c are correct, computed as 1 - Π_{i=n-c+1}^{n} (1 - k/i) (their numerically stable
    form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_metrics(prompt_index: list[int], correct: list[bool]) -> dict[str, float]:
    """eval/pass@k for k = 1, 2, 4, … up to the n samples each prompt got (and k = n), the
    mean over prompts of the unbiased estimator; eval/mean@n, the mean accuracy of all n
    samples (equal to pass@1; named as the papers report it)."""
    groups: dict[int, list[bool]] = {}
    for i, ok in zip(prompt_index, correct, strict=True):
        groups.setdefault(int(i), []).append(bool(ok))
    n = min(len(g) for g in groups.values())
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n} | {n})
    out = {
        f"eval/pass@{k}": sum(pass_at_k(len(g), sum(g), k) for g in groups.values()) / len(groups)
        for k in ks
    }
    out[f"eval/mean@{n}"] = sum(sum(g) / len(g) for g in groups.values()) / len(groups)
    return out
