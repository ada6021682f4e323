"""Multi-turn building blocks (pure, no Ray): tool-call parsing and running, the tool
environment's answers to good and bad calls, token-exact transcripts (assembled ids, loss mask
and log-prob positions checked by hand for 1, 2 and 3 turns, one cut at its token limit; the
re-encoding check catching drift; a template that rewrites earlier turns refused), and
episodes driven by a scripted turn generator: how each ends, their metrics, their layout as a
rollout, and single-turn episodes laid out as today's rollouts."""

from __future__ import annotations

import copy
import time
from typing import ClassVar

import pytest
import torch

from rlhf.envs import (
    BadCall,
    SingleTurn,
    ToolCall,
    ToolEnv,
    parse_tool_calls,
    run_with_timeout,
    tool_schema,
)
from rlhf.episodes import Limits, episode_extras, episode_metrics, run_episodes, to_rollout
from rlhf.transcripts import (
    TemplateError,
    add_environment,
    add_turn,
    environment_turn_ids,
    render_ids,
    retokenize_mismatch,
    start,
)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def broken(x: str) -> str:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("boom")


def sleepy(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke"


# ------------------------------------------------------------------ tool calls


def test_parse_tool_calls_good_and_malformed():
    text = (
        'Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}</tool_call>'
        '<tool_call>{name: add}</tool_call><tool_call>[1, 2]</tool_call><tool_call>{"name": "add"'
    )
    calls = parse_tool_calls(text)
    assert calls[:2] == [ToolCall("add", {"a": 2, "b": 3}), ToolCall("add", {"a": 1, "b": 1})]
    assert [type(c) for c in calls[2:]] == [BadCall, BadCall, BadCall]
    assert calls[2].error.startswith("not JSON") and "expected" in calls[3].error
    assert calls[4].error == "<tool_call> never closed"
    assert parse_tool_calls("The answer is 5.") == []


def test_tool_schema_from_hints_and_docstring():
    schema = tool_schema(add)
    assert schema["function"]["name"] == "add"
    assert schema["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "The first number.",
    }
    with pytest.raises(ValueError, match=r"tool .*lambda"):
        tool_schema(lambda x: x)


def test_run_with_timeout_returns_errors_instead_of_raising():
    assert run_with_timeout(add, {"a": 2, "b": 40}, 1.0) == (True, "42")
    assert run_with_timeout(broken, {"x": "?"}, 1.0) == (False, "RuntimeError: boom")
    ok, why = run_with_timeout(add, {"a": 1}, 1.0)
    assert not ok and why.startswith("TypeError")
    start_t = time.perf_counter()
    assert run_with_timeout(sleepy, {"seconds": 30}, 0.2) == (False, "timed out after 0.2s")
    assert time.perf_counter() - start_t < 2


def test_tool_env_answers_each_call_and_ends_on_an_answer():
    env = ToolEnv([add, broken, sleepy], timeout_s=0.2)
    assert env.reset({"prompt": "What is 2+3?"}) == [{"role": "user", "content": "What is 2+3?"}]
    step = env.step(
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "broken", "arguments": {"x": "1"}}</tool_call>'
        '<tool_call>{"name": "sleepy", "arguments": {"seconds": 5}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    )
    assert not step.done and step.info == {"tool_calls": 4.0, "tool_errors": 3.0}
    assert [m["content"] for m in step.messages] == [
        "5",
        "error: RuntimeError: boom",
        "error: timed out after 0.2s",
        "error: unknown tool 'nope' (tools: add, broken, sleepy)",
    ]
    assert all(m["role"] == "tool" for m in step.messages)
    bad = env.step("<tool_call>not json</tool_call>")
    assert bad.info["tool_errors"] == 1.0 and "malformed tool call" in bad.messages[0]["content"]
    assert env.step("It is 5.").done
    assert SingleTurn().step("anything").done


# ------------------------------------------------------------------ transcripts


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_environment_turn_ids_are_the_templates_text_after_an_assistant_turn(tok):
    extra = environment_turn_ids(tok, [{"role": "tool", "content": "42"}])
    # ChatML: the newline after <|im_end|>, the tool turn, the next generation prompt
    assert tok.decode(extra) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_transcript_ids_mask_and_logps_by_hand(tok, turns):
    """Turn k generates 'a{k}' + EOS (the last one cut at its token limit when turns = 3);
    each environment turn answers with a tool message."""
    eos = tok.eos_token_id
    t = start(tok, [{"role": "user", "content": "hi"}])
    prompt = render_ids(tok, [{"role": "user", "content": "hi"}], True)
    assert t.ids == prompt and not any(t.mask)
    expected_ids, expected_mask, expected_logps = (
        list(prompt),
        [False] * len(prompt),
        [0.0] * len(prompt),
    )
    for k in range(1, turns + 1):
        cut = turns == 3 and k == 3
        generated = ids_of(tok, f"a{k}") + ([] if cut else [eos])
        logps = [-0.1 * (k + j) for j in range(len(generated))]
        text = add_turn(t, tok, generated, logps, finished=not cut)
        assert text == f"a{k}"
        expected_ids += generated
        expected_mask += [True] * len(generated)
        expected_logps += logps
        if k < turns:
            env = [{"role": "tool", "content": f"r{k}"}]
            add_environment(t, tok, env)
            extra = [
                *ids_of(tok, f"\n<|im_start|>tool\nr{k}"),
                eos,
                *ids_of(tok, "\n<|im_start|>assistant\n"),
            ]
            expected_ids += extra
            expected_mask += [False] * len(extra)
            expected_logps += [0.0] * len(extra)
    assert t.ids == expected_ids and t.mask == expected_mask
    assert t.logps == pytest.approx(expected_logps)
    assert t.turns == turns and t.truncated == (turns == 3)
    assert t.prompt_length == len(prompt)
    # each turn's span holds exactly its generated ids
    for k, (lo, hi) in enumerate(t.turn_spans, start=1):
        assert tok.decode(t.ids[lo:hi], skip_special_tokens=True) == f"a{k}"
    assert retokenize_mismatch(t, tok) is None


def test_retokenize_check_catches_drift(tok):
    """The model generated 'a' and 'b' as two ids where the tokenizer would merge 'ab' into
    one (or the other way round): the text is the same, the ids are not."""
    t = start(tok, [{"role": "user", "content": "hi"}])
    merged = ids_of(tok, "the")
    split = [i for ch in "the" for i in ids_of(tok, ch)]
    assert merged != split  # the same text, two tokenisations
    add_turn(t, tok, [*split, tok.eos_token_id], [0.0] * (len(split) + 1), finished=True)
    lo, hi = t.turn_spans[0]
    first = retokenize_mismatch(t, tok)
    assert first is not None and lo <= first < hi  # caught inside the drifting turn


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    tok = copy.deepcopy(tok)  # the fixture is shared
    rewriting = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n(earlier) {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.chat_template = rewriting
    with pytest.raises(TemplateError, match="rewrites earlier turns"):
        environment_turn_ids(tok, [{"role": "tool", "content": "1"}])


# ------------------------------------------------------------------ episodes

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def scripted(tok, scripts: list[list[str]]):
    """A turn generator that plays each episode's script (one text per turn), each id with
    log-prob -(its position in the turn + 1) / 10, EOS at the end, cut at the budget."""
    turn_of: dict[int, int] = {}

    def generate(batch, budgets, ended=None):
        out = []
        for ids, budget in zip(batch, budgets, strict=True):
            episode = next(k for k, p in enumerate(prompts) if ids[: len(p)] == p)
            k = turn_of.get(episode, 0)
            turn_of[episode] = k + 1
            gen = [*ids_of(tok, scripts[episode][k]), tok.eos_token_id]
            cut = len(gen) > budget
            gen = gen[:budget]
            out.append((gen, [-(j + 1) / 10 for j in range(len(gen))], not cut))
        return out

    prompts: list[list[int]] = []
    return generate, prompts


def test_episodes_end_as_documented_and_lay_out_as_a_rollout(tok):
    questions = ["q one", "q two", "q three", "q four"]
    scripts = [
        [CALL, "It is 5."],  # a tool call, then the answer
        ["<tool_call>oops</tool_call>", "5"],  # a malformed call: an error message, then on
        [CALL, CALL, CALL, CALL],  # never answers: stops at max_turns
        ["a long answer that will not fit in the budget at all"],  # cut at its token budget
    ]
    generate, prompts = scripted(tok, scripts)
    rows = [{"prompt": q} for q in questions]
    prompts += [render_ids(tok, [{"role": "user", "content": q}], True) for q in questions]
    envs = [ToolEnv([add]) for _ in rows]
    limits = Limits(max_turns=3, max_total_tokens=1000)
    # the 4th episode gets a smaller budget through its own run
    episodes = run_episodes(envs[:3], rows[:3], tok, generate, limits)
    episodes += run_episodes(envs[3:], rows[3:], tok, generate, Limits(3, 6))
    assert [e.end for e in episodes] == ["answer", "answer", "max_turns", "truncated"]
    assert [e.transcript.turns for e in episodes] == [2, 2, 3, 1]
    # every turn is answered, the last one's messages dropped at max_turns: 3 calls
    assert [e.tool_calls for e in episodes] == [1.0, 1.0, 3.0, 0.0]
    assert [e.tool_errors for e in episodes] == [0.0, 1.0, 0.0, 0.0]
    assert episodes[0].transcript.messages[2] == {"role": "tool", "content": "5"}
    assert episodes[3].used == 6 and episodes[3].transcript.truncated
    m = episode_metrics(episode_extras(episodes, tok))
    assert m["rollout/turns"] == 2.0 and m["rollout/tool_calls"] == 1.25
    assert m["rollout/tool_error_rate"] == 0.2 and m["rollout/truncated"] == 0.25
    assert m["rollout/retokenize_mismatch"] == 0.0
    assert m["rollout/episode_tokens"] == sum(e.used for e in episodes) / 4
    r = to_rollout(episodes, [0, 1, 2, 3], tok.pad_token_id)
    assert r.finish == ["stop", "stop", "stop", "length"]
    for row, e in enumerate(episodes):
        p, t = e.prompt_length, e.transcript
        width = r.prompt_ids.shape[1]
        assert r.prompt_ids[row, width - p :].tolist() == t.ids[:p]
        n = len(t.ids) - p
        assert r.response_ids[row, :n].tolist() == t.ids[p:]
        # the loss mask: each turn's ids, never the environment's
        trained = [j for j, on in enumerate(r.response_mask[row].tolist()) if on]
        spans = [j - p for lo, hi in t.turn_spans for j in range(lo, hi)]
        assert trained == spans
        # the log-probs sit on the generated ids: -(position in its turn + 1) / 10
        for lo, hi in t.turn_spans:
            got = r.logps[row, lo - p : hi - p].tolist()
            assert got == pytest.approx([-(j + 1) / 10 for j in range(hi - lo)])
        assert float(r.logps[row][~r.response_mask[row]].abs().sum()) == 0.0


def test_single_turn_episodes_are_todays_rollouts(tok):
    """Through the episode path, a single-turn environment gives the prompt as the chat
    template renders it and one generated response: the layout of a single-turn rollout."""
    generate, prompts = scripted(tok, [["fine"], ["ok then"]])
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    prompts += [render_ids(tok, [{"role": "user", "content": q}], True) for q in ("a", "b")]
    episodes = run_episodes([SingleTurn(), SingleTurn()], rows, tok, generate, Limits(1, 32))
    r = to_rollout(episodes, [0, 1], tok.pad_token_id)
    for row, text in enumerate(["fine", "ok then"]):
        n = int(r.response_mask[row].sum())
        assert r.response_ids[row, :n].tolist() == [*ids_of(tok, text), tok.eos_token_id]
        assert bool(r.response_mask[row, :n].all()) and not bool(r.response_mask[row, n:].any())
    assert [e.end for e in episodes] == ["answer", "answer"] and r.finish == ["stop", "stop"]


def tiny_engine(tiny_path, tok, eos_boost: float):
    """The HF engine on the tiny model, which rarely ends a turn by itself: +eos_boost on its
    EOS logit (a hook on the head, so a teacher-forced forward of the same module sees it)."""
    from actors.rollout import HFBackend
    from rlhf.config import build_config
    from rlhf.roles import engine_spec

    cfg = build_config(
        {
            "algorithm": "ppo",
            "model": {"name_or_path": str(tiny_path)},
            "roles": {"reward": {"type": "function", "function": "a:b"}},
        }
    )
    backend = HFBackend(engine_spec(cfg), "cpu")

    def favour_eos(module, args, logits):
        logits[..., tok.eos_token_id] += eos_boost
        return logits

    backend.model.lm_head.register_forward_hook(favour_eos)
    return backend


class Chatty:
    """Answers every turn with a user message, so episodes run to max_turns."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, assistant):
        from rlhf.envs import Step

        return Step([{"role": "user", "content": "go on"}], reward=0.5)


def test_episodes_on_the_hf_engine_keep_its_tokens_and_log_probs(tiny_path, tok):
    """Three-turn episodes sampled by the real HF engine (tiny model, fp32): the transcript
    holds exactly the sampled ids, and the engine's log-prob at each generated position equals
    the trainer's teacher-forced log-prob of the assembled sequence there (the tokens trained
    on are the tokens generated); environment ids carry no log-prob and no loss."""
    from rlhf.config import RolloutConfig
    from rlhf.episodes import engine_turns
    from rlhf.objectives import token_logps

    # +5 on the EOS logit, in the engine and in the teacher-forced forward alike
    backend = tiny_engine(tiny_path, tok, 5.0)
    settings = RolloutConfig(temperature=1.0, max_new_tokens=12)
    turns = engine_turns(backend.generate, settings, seed=7, pad_id=tok.pad_token_id)
    rows = [{"prompt": "Review the film"}, {"prompt": "Hi"}, {"prompt": "A long opening line"}]
    episodes = run_episodes([Chatty() for _ in rows], rows, tok, turns, Limits(3, 40))
    assert all(e.transcript.turns >= 1 for e in episodes)
    assert any(e.transcript.turns == 3 for e in episodes)  # some ran every turn
    assert all(e.rewards == [0.5] * e.transcript.turns for e in episodes if e.end != "truncated")
    for e in episodes:
        t = e.transcript
        ids = torch.tensor([t.ids])
        with torch.no_grad():
            forced = token_logps(backend.model, ids, torch.ones_like(ids))[0]
        generated = [j for j, on in enumerate(t.mask) if on]
        engine = torch.tensor([t.logps[j] for j in generated])
        # column j - 1 scores token j
        torch.testing.assert_close(engine, forced[[j - 1 for j in generated]], rtol=0, atol=1e-4)
        assert all(t.logps[j] == 0.0 for j, on in enumerate(t.mask) if not on)
        # the model's turns stay within the budget (an environment turn may pass it, ending
        # the episode)
        assert e.transcript.turn_spans[-1][1] - e.prompt_length <= 40
        assert e.used <= 40 or e.end == "max_tokens"


def prompt_batch(tok, prompts: list, fields: list[dict] | None = None):
    from rlhf.data.collate import PromptCollator
    from rlhf.data.tokenize import PromptFeatures

    feats = []
    for i, p in enumerate(prompts):
        text = p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False)
        ids = render_ids(tok, p, True) if not isinstance(p, str) else ids_of(tok, p)
        feats.append(PromptFeatures(i, ids, text, (fields or [{}] * len(prompts))[i], p))
    return PromptCollator(tok.pad_token_id)(feats)


def test_single_turn_episodes_reproduce_the_engine_bit_for_bit(tiny_path, tok):
    """The single-turn environment through the episode path gives the engine's own rollout:
    the same prompt ids, sampled ids, masks, log-probs and finish reasons, bit for bit (the
    same seed and batch), for n samples per prompt, rows that stop and rows cut at the limit."""
    from rlhf.config import EnvironmentConfig, RolloutConfig
    from rlhf.episodes import sample_episodes

    backend = tiny_engine(tiny_path, tok, 4.0)
    batch = prompt_batch(tok, ["Review the film", "Hi", [{"role": "user", "content": "Tell me"}]])
    plain = RolloutConfig(n_samples_per_prompt=3, max_new_tokens=10)
    settings = plain.model_copy(update={"environment": EnvironmentConfig(name="single_turn")})
    want = backend.generate(batch, plain, 1234)
    got = sample_episodes(SingleTurn, None, batch, settings, backend.generate, 1234, tok)
    assert set(want.finish) == {"stop", "length"}  # both kinds of row are covered
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "prompt_index"):
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(want.logps, got.logps) and want.finish == got.finish
    assert got.extras["turns"].tolist() == [1.0] * 9
    # the drift check, recomputed: a random model's samples often do not re-encode to the
    # same ids (what training on a decoded-and-re-encoded transcript would silently change)
    for k in range(9):
        generated = want.response_ids[k][want.response_mask[k]].tolist()
        generated = [i for i in generated if i != tok.eos_token_id]
        again = ids_of(tok, tok.decode(generated, skip_special_tokens=True))
        drift = again[: len(generated)] != generated
        assert got.extras["retokenize_mismatch"][k].item() == float(drift), k
    assert 0 < got.extras["retokenize_mismatch"].sum() < 9
    assert got.extras["truncated"].tolist() == [float(f == "length") for f in want.finish]


def test_an_episode_ended_by_its_environment_turn_and_its_sequences(tok):
    """Two turns, then an environment turn that reaches max_total_tokens: the episode ends
    (max_tokens) and that last environment turn is left out of the rollout; the forward
    attends to the environment's ids between the turns, the loss does not count them, and the
    reward reads the last turn only."""
    from rlhf.rollout import sequences

    generate, prompts = scripted(tok, [[CALL, CALL, "never reached"]])
    rows = [{"prompt": "q"}]
    prompts += [render_ids(tok, [{"role": "user", "content": "q"}], True)]
    call_ids = len(ids_of(tok, CALL)) + 1
    env_ids = len(environment_turn_ids(tok, [{"role": "tool", "content": "5"}]))
    total = 2 * call_ids + env_ids + 1  # the second environment turn passes it
    episodes = run_episodes([ToolEnv([add])], rows, tok, generate, Limits(5, total))
    e = episodes[0]
    assert e.end == "max_tokens" and e.transcript.turns == 2
    extras = episode_extras(episodes, tok)
    r = to_rollout(episodes, [0], tok.pad_token_id, extras)
    assert r.finish == ["length"]
    width = 2 * call_ids + env_ids
    assert r.response_ids.shape[1] == width  # the second environment turn is not in it
    assert extras["last_turn_start"].tolist() == [call_ids + env_ids]
    _, attention, action = sequences(r)
    p = r.prompt_ids.shape[1]
    assert bool(attention[0].all())
    gap = range(p - 1 + call_ids, p - 1 + call_ids + env_ids)  # action column t scores t+1
    assert not any(bool(action[0, j]) for j in gap)
    assert int(action[0].sum()) == 2 * call_ids
    m = episode_metrics(extras)
    assert m["rollout/turns"] == 2.0 and m["rollout/truncated"] == 1.0
    assert m["rollout/tool_calls"] == 2.0 and m["rollout/tool_error_rate"] == 0.0


def test_rollout_extras_survive_merge_select_and_a_checkpoint(tmp_path):
    from rlhf.rollout import Rollout, load_rollouts, merge_rollouts, save_rollouts, select_rows

    def part(k: int, extras: bool) -> Rollout:
        return Rollout(
            torch.full((2, 3), k),
            torch.ones(2, 3, dtype=torch.bool),
            torch.full((2, 4), k),
            torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool),
            torch.full((2, 4), -0.1 * k),
            ["stop", "length"],
            torch.tensor([k, k]),
            {"turns": torch.tensor([2.0, 1.0]) + k, "env_reward": torch.tensor([0.7, 0.1])}
            if extras
            else {},
        )

    merged = merge_rollouts([part(1, True), part(2, True)], pad_id=0)
    assert merged.extras["turns"].tolist() == [3.0, 2.0, 4.0, 3.0]
    picked = select_rows(merged, [3, 0])
    assert picked.extras["turns"].tolist() == [3.0, 3.0]
    assert picked.extras["env_reward"].tolist() == pytest.approx([0.1, 0.7])
    save_rollouts(tmp_path / "inflight", [(5, 4, picked), (6, 5, part(3, False))])
    (s1, v1, back), (_, _, plain) = load_rollouts(tmp_path / "inflight")
    assert (s1, v1) == (5, 4) and plain.extras == {}
    assert back.extras.keys() == picked.extras.keys()
    assert all(torch.equal(back.extras[k], picked.extras[k]) for k in picked.extras)


class Clocked:
    """Chatty, recording when each of its steps began."""

    starts: ClassVar[list[float]] = []

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, assistant):
        from rlhf.envs import Step

        Clocked.starts.append(time.perf_counter())
        return Step([{"role": "user", "content": "go on"}], reward=0.5)


def test_the_hf_engine_steps_an_ended_turns_environment_while_the_batch_samples(tiny_path, tok):
    """The HF decode loop reports each turn as it ends: its environment steps at once, while
    the batch's slower turns are still sampled; the episodes are the same as when every
    environment waits for the whole batch (an engine that reports nothing early)."""
    from rlhf.config import RolloutConfig
    from rlhf.episodes import engine_turns

    backend = tiny_engine(tiny_path, tok, 3.0)
    settings = RolloutConfig(temperature=1.0, max_new_tokens=24)
    returned: list[float] = []

    def timed(prompts, s, seed, on_finish=None):
        out = backend.generate(prompts, s, seed, on_finish=on_finish)
        returned.append(time.perf_counter())
        return out

    def batch_only(prompts, s, seed):  # reports nothing early
        return backend.generate(prompts, s, seed)

    rows = [{"prompt": p} for p in ("Review the film", "Hi", "A long opening line", "Go", "Why")]
    Clocked.starts = []
    streamed = run_episodes(
        [Clocked() for _ in rows], rows, tok, engine_turns(timed, settings, 3, 0), Limits(2, 60)
    )
    first_batch_end = returned[0]
    early = [t for t in Clocked.starts if t < first_batch_end]
    assert early, "no environment stepped before its turn's batch was sampled"
    waited = run_episodes(
        [Clocked() for _ in rows],
        rows,
        tok,
        engine_turns(batch_only, settings, 3, 0),
        Limits(2, 60),
    )
    for a, b in zip(streamed, waited, strict=True):
        assert a.transcript.ids == b.transcript.ids and a.transcript.logps == b.transcript.logps
        assert a.end == b.end and a.rewards == b.rewards
