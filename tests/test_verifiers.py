"""Verifiable rewards: answer extraction, mathematical equivalence (math-verify), exact /
regex / format checks, weighted sums, the code sandbox against misbehaving programs, pass@k
against its formula, and the reward sources that run them (in-process and in a process pool)."""

from __future__ import annotations

import math
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch

from actors.reward import (
    FunctionScorer,
    Scores,
    VerifiableScorer,
    function_fields,
    make_scorer,
    required_fields,
)
from rlhf.config import ConfigError, RewardConfig, VerifierConfig, build_config
from rlhf.roles import RewardSpec
from rlhf.sandbox import run_python
from rlhf.verifiers import (
    check,
    extract_answer,
    extract_boxed,
    last_number,
    math_equal,
    pass_at_k,
    pass_metrics,
    score_sample,
)


def verifier(**kw) -> dict:
    cfg = VerifierConfig(**kw)
    return {**cfg.model_dump(), "field": cfg.ground_truth}


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        ("so the answer is \\boxed{42}.", "boxed", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "boxed", "\\frac{1}{2}"),
        ("nested \\boxed{\\sqrt{\\frac{a}{b}}} end", "boxed", "\\sqrt{\\frac{a}{b}}"),
        ("cut off \\boxed{\\frac{1}{2", "boxed", None),
        ("no box here 7", "boxed", None),
        ("3 apples and 1,234.5 pears", "last_number", "1234.5"),
        ("from -7 to -12", "last_number", "-12"),
        ("half is 1/2", "last_number", "1/2"),
        ("no digits", "last_number", None),
        ("<think>2+2</think><answer> 4 </answer>", "answer_tag", "4"),
        ("x = 3, so \\boxed{5} (not 9)", "auto", "5"),
        ("<answer>12</answer> and 13", "auto", "12"),
        ("it is 8, or 9", "auto", "9"),
        ("  Paris. ", "none", "Paris."),
    ],
)
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_extract_helpers_edge_cases():
    assert extract_boxed("") is None and last_number("") is None
    assert extract_boxed("\\fbox{3}") == "3"
    with pytest.raises(ValueError, match="unknown answer extraction"):
        extract_answer("1", "first")


# ------------------------------------------------------------------ math equivalence


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("72", "72"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("1/10", "0.1"),  # 0.1 is not exact in binary: compared as numbers, not floats' bits
        ("0.7", "7/10"),
        ("1,000", "1000"),
        ("7.0", "7"),
        ("1+x", "x+1"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ("-3", "-3"),
    ],
)
def test_math_equal_accepts_equivalent_answers(predicted, gold):
    verdict = math_equal(predicted, gold)
    assert verdict.value == 1.0, verdict.reason


@pytest.mark.parametrize(
    "predicted, gold",
    [("73", "72"), ("0.51", "\\frac{1}{2}"), ("x+2", "x+1"), ("3", "-3"), ("0.7", "0.07")],
)
def test_math_equal_rejects_different_answers(predicted, gold):
    verdict = math_equal(predicted, gold)
    assert verdict.value == 0.0 and "wrong" in verdict.reason


def test_math_equal_reports_an_unparseable_ground_truth():
    verdict = math_equal("4", "  ")
    assert verdict.value == 0.0 and "ground truth" in verdict.reason


# ------------------------------------------------------------------ the other verifiers, sums


def test_exact_regex_and_format_verifiers():
    exact = verifier(kind="exact", extract="answer_tag")
    assert check(exact, "<answer> Paris. </answer>", {"answer": "paris"}).value == 1.0
    assert check(exact, "<answer>Lyon</answer>", {"answer": "Paris"}).value == 0.0
    assert "no answer found" in check(exact, "Paris", {"answer": "Paris"}).reason
    regex = verifier(kind="regex", pattern=r"\bdef \w+\(")
    assert check(regex, "x\ndef f(a):", {}).value == 1.0
    assert check(regex, "lambda a: a", {}).value == 0.0
    fmt = verifier(kind="format")
    assert check(fmt, "<think>a\nb</think>\n<answer>3</answer>", {}).value == 1.0
    # format matches the whole response: trailing text breaks it
    assert check(fmt, "<think>a</think><answer>3</answer> more", {}).value == 0.0


def test_weighted_sum_of_accuracy_and_format():
    verifiers = [
        verifier(kind="math", extract="answer_tag"),
        verifier(kind="format", weight=0.1),
    ]
    total, parts, reason = score_sample(
        verifiers, "<think>7*6</think><answer>42</answer>", {"answer": "42"}
    )
    assert parts == [1.0, 1.0] and total == pytest.approx(1.1) and "math: correct" in reason
    total, parts, _ = score_sample(verifiers, "<answer>41</answer>", {"answer": "42"})
    assert parts == [0.0, 0.0] and total == 0.0
    total, parts, _ = score_sample(
        verifiers, "<think>.</think><answer>4</answer>", {"answer": "42"}
    )
    assert parts == [0.0, 1.0] and total == pytest.approx(0.1)


def test_a_failing_verifier_scores_zero_with_its_reason():
    total, parts, reason = score_sample([verifier(kind="math")], "4", {"answer": None})
    assert total == 0.0 and parts == [0.0]
    assert reason.startswith("math") and reason != "math: correct"


def test_verifier_config_is_checked():
    with pytest.raises(ValueError, match="needs `pattern`"):
        VerifierConfig(kind="regex")
    with pytest.raises(ValueError, match="not a regular expression"):
        VerifierConfig(kind="format", pattern="(")
    assert VerifierConfig(kind="code").ground_truth == "tests"
    assert VerifierConfig(kind="math", field="solution").ground_truth == "solution"
    assert VerifierConfig(kind="format").ground_truth is None
    with pytest.raises(ValueError, match=r"needs reward\.verifiers"):
        RewardConfig(type="verifiable")
    with pytest.raises(ValueError, match="type verifiable only"):
        RewardConfig(type="function", function="a:b", verifiers=[{"kind": "math"}])


# ------------------------------------------------------------------ code sandbox

SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def test_code_verifier_runs_the_last_block_against_the_tests():
    code = verifier(kind="code", timeout_s=5)
    assert check(code, "First try:\n```python\nx=1\n```\n" + SOLUTION, {"tests": TESTS}).value == 1
    wrong = check(code, "```python\ndef add(a, b):\n    return a - b\n```", {"tests": TESTS})
    assert wrong.value == 0 and "AssertionError" in wrong.reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "X"
    )
    return state not in ("Z", "X")


def test_sandbox_bounds_a_hanging_program():
    start = time.perf_counter()
    r = run_python("while True:\n    pass", timeout_s=1)
    assert not r.passed and r.reason == "timeout after 1s"
    assert time.perf_counter() - start < 5


def test_sandbox_kills_every_process_a_forking_program_left(tmp_path):
    pids = tmp_path / "pids"
    program = (
        "import os, time\n"
        "for _ in range(8):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"  # a non-root user may not fork at all (RLIMIT_NPROC)
        "    if pid == 0:\n"
        f"        open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "time.sleep(60)\n"
    )
    r = run_python(program, timeout_s=1.5)
    assert not r.passed and r.reason.startswith("timeout")
    children = [int(x) for x in pids.read_text().split()] if pids.exists() else []
    time.sleep(0.2)
    assert not [p for p in children if _alive(p)]


def test_sandbox_stops_a_memory_hungry_program():
    r = run_python("x = bytearray(4 * 1024**3)\nprint(len(x))", timeout_s=5, memory_mb=256)
    assert not r.passed and r.reason.startswith("memory limit")
    assert r.seconds < 5


def test_sandbox_caps_a_flood_of_output():
    r = run_python("while True:\n    print('x' * 10000)", timeout_s=10, output_bytes=1 << 16)
    assert not r.passed and r.reason == "output limit (65536 bytes)"
    assert r.seconds < 10


def test_sandbox_inherits_no_secret_and_removes_its_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_API_TOKEN", "s3cret")
    marker = tmp_path / "cwd"
    r = run_python(
        "import os\n"
        "assert 'MY_API_TOKEN' not in os.environ, 'leaked'\n"
        f"open({str(marker)!r}, 'w').write(os.getcwd())\n"
    )
    assert r.passed, r.reason
    workdir = Path(marker.read_text())
    assert workdir.name.startswith("rlhf-sandbox-") and not workdir.exists()


# ------------------------------------------------------------------ pass@k


@pytest.mark.parametrize(
    "n, c, k", [(4, 0, 1), (4, 4, 4), (4, 1, 1), (8, 3, 2), (10, 7, 5), (5, 2, 4)]
)
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_metrics_average_the_estimator_over_prompts():
    # prompt 0: 1 of 4 correct; prompt 1: 0 of 4; prompt 2: 4 of 4 (rows interleaved on purpose)
    index = [0, 1, 2] * 4
    correct = [(i == 0 and j == 0) or i == 2 for j in range(4) for i in range(3)]
    m = pass_metrics(index, correct)
    assert set(m) == {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/mean@4"}
    assert m["eval/pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["eval/pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/mean@4"] == pytest.approx(m["eval/pass@1"])


# ------------------------------------------------------------------ reward sources


def with_fields(prompts, responses, answer, tolerance=0.0):
    return [float(r.strip() == a) for r, a in zip(responses, answer, strict=True)]


def every_field(prompts, responses, **fields):
    return [float(len(fields)) for _ in responses]


def test_function_rewards_receive_the_fields_they_name():
    assert function_fields(with_fields) == (("answer",), False)
    assert function_fields(every_field) == ((), True)
    scorer = FunctionScorer("tests.test_verifiers:with_fields")
    rows = [{"answer": "4", "id": 1}, {"answer": "5", "id": 2}]
    assert scorer(["p", "q"], ["4", "4"], rows).tolist() == [1.0, 0.0]
    assert FunctionScorer("tests.test_verifiers:every_field")(["p"], ["r"], rows[:1]).tolist() == [
        2.0
    ]
    rc = RewardConfig(type="function", function="tests.test_verifiers:with_fields")
    assert required_fields(rc) == ("answer",)
    rc = RewardConfig(
        type="verifiable",
        verifiers=[{"kind": "math"}, {"kind": "format"}, {"kind": "code", "field": "checks"}],
    )
    assert required_fields(rc) == ("answer", "checks")


def test_verifiable_scores_are_the_same_in_a_process_pool():
    rng = random.Random(0)
    answers = [str(rng.randint(0, 20)) for _ in range(24)]
    responses = [
        f"<think>hmm</think><answer>{a if i % 3 else int(a) + 1}</answer>" if i % 4 else a
        for i, a in enumerate(answers)
    ]
    rc = RewardConfig(
        type="verifiable",
        verifiers=[{"kind": "math", "extract": "auto"}, {"kind": "format", "weight": 0.5}],
        workers=2,
    )
    fields = [{"answer": a} for a in answers]
    inline = VerifiableScorer(rc.model_copy(update={"workers": 0}))(None, responses, fields)
    pool = VerifiableScorer(rc)
    try:
        pooled = pool(None, responses, fields)
    finally:
        pool.close()
    assert torch.equal(inline.values, pooled.values)
    assert inline.correct == pooled.correct and inline.reasons == pooled.reasons
    expected = [
        (1.0 if (i % 3 or i % 4 == 0) else 0.0) + (0.5 if i % 4 else 0.0)
        for i in range(len(answers))
    ]
    assert inline.values.tolist() == pytest.approx(expected)
    assert inline.metrics["reward/math"] == pytest.approx(
        sum(1.0 for i in range(24) if i % 3 or i % 4 == 0) / 24
    )
    assert inline.metrics["reward/format"] == pytest.approx(18 / 24)


def test_reward_wrapper_times_every_source_and_selects_rows():
    spec = RewardSpec(
        RewardConfig(type="function", function="tests.test_verifiers:with_fields"), 64, None
    )
    scores = make_scorer(spec)(["p", "q", "r"], ["1", "2", "3"], [{"answer": "1"}] * 3)
    assert isinstance(scores, Scores) and scores.values.tolist() == [1.0, 0.0, 0.0]
    assert scores.metrics["timing/reward"] >= 0 and scores.correct is None
    both = Scores.cat([scores.select([2, 0]), scores.select([1])])
    assert both.values.tolist() == [0.0, 1.0, 0.0]


def test_run_config_wires_verifiers_and_presets():
    cfg = build_config(
        {
            "algorithm": "ppo",
            "roles": {
                "reward": {"type": "verifiable", "verifiers": [{"kind": "math"}]},
                "rollout": {"n_samples_per_prompt": 4},
            },
            "ppo": {"preset": "dapo", "clip_eps_high": 0.3},
        }
    )
    p = cfg.ppo
    assert (p.estimator, p.clip_eps, p.clip_eps_high, p.dynamic_sampling) == (
        "grpo",
        0.2,
        0.3,
        True,
    )
    assert p.overlong_buffer == "auto" and p.kl_coef == 0.0 and cfg.roles.reward.in_driver
    gspo = build_config(
        {
            "algorithm": "ppo",
            "roles": {
                "reward": {"type": "function", "function": "a:b"},
                "rollout": {"n_samples_per_prompt": 2},
            },
            "ppo": {"preset": "gspo"},
        }
    ).ppo
    assert (gspo.policy_loss, gspo.clip_eps, gspo.clip_eps_high) == ("gspo", 3e-4, 4e-4)
    assert gspo.aggregation == "seq_mean_token_mean"
    with pytest.raises(ConfigError, match="synchronous loop"):
        build_config(
            {
                "algorithm": "ppo",
                "roles": {
                    "reward": {"type": "function", "function": "a:b"},
                    "rollout": {"n_samples_per_prompt": 2, "max_staleness": 1},
                },
                "ppo": {"preset": "dapo"},
            }
        )
    with pytest.raises(ConfigError, match="not with policy_loss cispo"):
        build_config({"ppo": {"policy_loss": "cispo", "dual_clip": 3.0}})


def test_sandbox_leaves_no_process_behind_after_a_timeout():
    before = subprocess.run(["ps", "-e", "-o", "pid="], capture_output=True, text=True).stdout
    run_python("import time\ntime.sleep(30)", timeout_s=0.5)
    after = subprocess.run(["ps", "-e", "-o", "pid=,args="], capture_output=True, text=True).stdout
    new = [
        line
        for line in after.splitlines()
        if line.split()[0] not in before.split() and "main.py" in line
    ]
    assert not new


def test_math_off_the_main_thread_says_once_that_its_timeout_is_dropped(caplog):
    import threading

    import rlhf.logs

    rlhf.logs._said.discard(("rlhf.verifiers", "math:unbounded"))
    verdicts = []
    for _ in range(2):
        worker = threading.Thread(target=lambda: verdicts.append(math_equal("0.5", "1/2")))
        worker.start()
        worker.join()
    assert [v.value for v in verdicts] == [1.0, 1.0]  # still verified, without the bound
    said = [r for r in caplog.records if "cannot be enforced" in r.message]
    assert len(said) == 1 and "roles.reward.workers" in said[0].message
