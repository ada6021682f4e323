"""Multi-turn episodes (pure: no Ray): environments and a turn generator in, token-exact
transcripts out, and from them the rollout the trainer takes.

`run_episodes` drives a batch of episodes turn by turn: the generator produces one assistant
turn for every episode still running (from its assembled ids, within its remaining token
budget), each turn is appended as generated, the environment answers it (every finished turn,
so its counts and rewards include the last one; the turns of a batch are answered
concurrently, in threads, so slow tools overlap), and its messages are appended as template
ids. An episode ends when the environment says done (the answer), when a turn is cut at its
token budget, at `max_turns` (the environment's last messages dropped), or when the next turn
would have no tokens left (`max_total_tokens` over the whole episode after the prompt).

Turns are generated batch by batch. An engine that reports a turn as soon as it has ended (the
HF backend's decode loop does) lets its environment step at once, in a thread, while the
batch's slower turns are still sampled; the episode's next turn still waits for the batch.

`sample_episodes` is the engines' entry point (actors.rollout.SeededSampler): a prompt batch
in, n episodes per prompt, the rollout out with each row's episode counts in `extras`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.data.collate import pad
from rlhf.envs import Environment, Step, environment_factory, prompt_messages
from rlhf.rollout import Rollout, response_attention
from rlhf.transcripts import Transcript, add_environment, add_turn, retokenize_mismatch, start

#: (each running episode's ids, its token budget for this turn, optionally a callback
#: `ended(k, ids)` for a turn k that ended with EOS within its budget while others still run)
#: -> per episode (generated ids, the engine's log-prob of each, whether it ended with EOS).
TurnGenerator = Callable[..., list[tuple[list[int], list[float], bool]]]


@dataclass(frozen=True)
class Limits:
    max_turns: int = 1
    """Assistant turns per episode."""
    max_total_tokens: int = 256
    """Tokens after the prompt (the model's and the environment's) per episode: no turn of the
    model goes past it; an environment turn that reaches it ends the episode (its template
    ids are kept whole, so they may pass it)."""
    max_turn_tokens: int | None = None
    """Tokens of one turn of the model (None: only max_total_tokens bounds it)."""

    def budget(self, used: int) -> int:
        left = self.max_total_tokens - used
        return left if self.max_turn_tokens is None else min(left, self.max_turn_tokens)


@dataclass
class Episode:
    transcript: Transcript
    end: str = ""
    """answer (the environment said done), truncated (a turn cut at its budget), max_turns,
    max_tokens (no budget left for another turn)."""
    rewards: list[float] = field(default_factory=list)
    """Per-turn rewards the environment gave (none: the episode's reward comes from roles.reward)."""
    tool_calls: float = 0.0
    tool_errors: float = 0.0

    @property
    def prompt_length(self) -> int:
        return self.transcript.prompt_length

    @property
    def used(self) -> int:
        return len(self.transcript.ids) - self.prompt_length


def episodes_for(env_cfg, tokenizer) -> tuple[Callable[[], Environment], list[dict] | None]:
    """environment_factory of a roles.rollout.environment section, once the tokenizer is known
    to render multi-turn conversations (a chat template): said before any episode runs."""
    from rlhf.data.tokenize import require_chat_template

    built = environment_factory(env_cfg)
    if env_cfg.name != "single_turn":
        require_chat_template(tokenizer, "a multi-turn episode")
    return built


def first_transcript(
    env: Environment, row: Mapping[str, Any], tokenizer, tools, prompt_ids: list[int] | None
) -> Transcript:
    """The episode's start: `prompt_ids` (the data pipeline's ids of the row's prompt) when the
    environment opens with the row's own prompt and no tools are declared, else its first
    messages through the chat template (with the tools' schemas)."""
    messages = env.reset(row)
    if prompt_ids is not None and tools is None and messages == prompt_messages(row):
        n = len(prompt_ids)
        return Transcript(list(prompt_ids), [False] * n, [0.0] * n, messages)
    return start(tokenizer, messages, tools)


def run_episodes(
    envs: list[Environment],
    rows: list[Mapping[str, Any]],
    tokenizer,
    generate: TurnGenerator,
    limits: Limits,
    tools: list[dict] | None = None,
    prompt_ids: list[list[int]] | None = None,
) -> list[Episode]:
    """One episode per (environment, row), run to its end (see the module docstring);
    `prompt_ids`: each row's prompt as the data pipeline tokenised it (see first_transcript)."""
    episodes = []
    for k, (env, row) in enumerate(zip(envs, rows, strict=True)):
        episodes.append(
            Episode(
                first_transcript(env, row, tokenizer, tools, prompt_ids[k] if prompt_ids else None)
            )
        )
    running = list(range(len(episodes)))
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="env") as pool:
        while running:
            budgets = [limits.budget(episodes[i].used) for i in running]
            answered: dict[int, Any] = {}

            def ended(k: int, ids: list[int], running=running, answered=answered) -> None:
                """A turn that ended while the batch still samples: its environment steps now."""
                text = tokenizer.decode(ids, skip_special_tokens=True)
                answered[running[k]] = pool.submit(envs[running[k]].step, text)

            turns = generate([episodes[i].transcript.ids for i in running], budgets, ended)
            for i, (ids, logps, finished) in zip(running, turns, strict=True):
                e = episodes[i]
                text = add_turn(e.transcript, tokenizer, ids, logps, finished)
                if finished and i not in answered:
                    answered[i] = pool.submit(envs[i].step, text)
                elif not finished:
                    e.end = "truncated"
            still = []  # in episode order, whichever turn ended first: the next batch's rows
            for i in (i for i in running if i in answered):
                if _record(episodes[i], answered[i].result(), tokenizer, limits, tools):
                    still.append(i)
            running = still
    return episodes


def _record(e: Episode, step: Step, tokenizer, limits: Limits, tools) -> bool:
    """Apply the environment's answer to a finished turn; whether the episode goes on."""
    e.tool_calls += step.info.get("tool_calls", 0.0)
    e.tool_errors += step.info.get("tool_errors", 0.0)
    if step.reward is not None:
        e.rewards.append(float(step.reward))
    if step.done:
        e.end = "answer"
        return False
    if e.transcript.turns >= limits.max_turns:
        e.end = "max_turns"
        return False
    add_environment(e.transcript, tokenizer, step.messages, tools)
    if limits.budget(e.used) <= 0:
        e.end = "max_tokens"
        return False
    return True


def engine_turns(generate: Callable, settings, seed: int, pad_id: int) -> TurnGenerator:
    """A TurnGenerator over an engine backend's `generate(PromptBatch, RolloutConfig, seed) ->
    Rollout` (the HF and vLLM backends): the running episodes' ids left-padded into one batch,
    one sample each, up to the largest budget; a turn longer than its own budget is cut there
    (then unfinished). The first call gets `seed` (a single-turn episode samples as the
    engine's own rollout would), each later one its own stream (turn k: seed + k·(10^9+7),
    apart from the seeds of later steps). A backend whose generate takes `on_finish` (HF)
    reports each turn that ends within its budget while the batch still samples."""
    import inspect

    from rlhf.types import PromptBatch

    calls = [0]
    streams = "on_finish" in inspect.signature(generate).parameters

    def turns(batch: list[list[int]], budgets: list[int], ended=None):
        prompts = PromptBatch(
            pad(batch, pad_id, left=True),
            pad([[True] * len(ids) for ids in batch], False, left=True, dtype=torch.bool),
            torch.arange(len(batch)),
        )
        sampling = settings.model_copy(
            update={"n_samples_per_prompt": 1, "max_new_tokens": max(budgets)}
        )
        seed_k = seed + calls[0] * 1_000_000_007
        if streams and ended is not None:

            def on_finish(k: int, ids: list[int]) -> None:
                if len(ids) <= budgets[k]:  # cut at its own budget, it did not end
                    ended(k, ids)

            r = generate(prompts, sampling, seed_k, on_finish=on_finish)
        else:
            r = generate(prompts, sampling, seed_k)
        calls[0] += 1
        out = []
        for i, budget in enumerate(budgets):
            keep = r.response_mask[i].bool()
            ids, logps = r.response_ids[i][keep].tolist(), r.logps[i][keep].tolist()
            finished = r.finish[i] == "stop" and len(ids) <= budget
            out.append((ids[:budget], logps[:budget], finished))
        return out

    return turns


#: Per-row counts a multi-turn rollout carries in Rollout.extras (floats, one per row).
EXTRAS = (
    "turns",
    "tool_calls",
    "tool_errors",
    "episode_tokens",
    "truncated",
    "retokenize_mismatch",
    "env_reward",
    "last_turn_start",
)


def episode_extras(episodes: list[Episode], tokenizer, tools=None) -> dict[str, torch.Tensor]:
    """Each episode's counts (EXTRAS): turns, tool calls and errors, tokens after the prompt,
    whether a token limit cut it, whether its ids differ from a re-encoding of the
    conversation (the drift check), the sum of the environment's rewards, and where its last
    turn starts in the response (the answer the reward reads)."""
    rows = {key: [] for key in EXTRAS}
    for e in episodes:
        rows["turns"].append(e.transcript.turns)
        rows["tool_calls"].append(e.tool_calls)
        rows["tool_errors"].append(e.tool_errors)
        rows["episode_tokens"].append(e.used)
        rows["truncated"].append(e.end in ("truncated", "max_tokens"))
        drift = retokenize_mismatch(e.transcript, tokenizer, tools, after=e.prompt_length)
        rows["retokenize_mismatch"].append(drift is not None)
        rows["env_reward"].append(sum(e.rewards))
        rows["last_turn_start"].append(e.transcript.turn_spans[-1][0] - e.prompt_length)
    return {key: torch.tensor(values, dtype=torch.float64) for key, values in rows.items()}


def episode_metrics(extras: dict[str, torch.Tensor]) -> dict[str, float]:
    """rollout/turns, /tool_calls (per episode), /tool_error_rate (errors per call),
    /episode_tokens (after the prompt), /truncated (fraction cut by a token limit),
    /retokenize_mismatch (fraction whose ids differ from a re-encoding of the conversation)
    and /env_reward (the environment's rewards per episode) of a rollout's extras."""
    if not extras:
        return {}
    calls = float(extras["tool_calls"].sum())
    mean = {k: float(extras[k].mean()) for k in EXTRAS if k != "last_turn_start"}
    mean["tool_error_rate"] = float(extras["tool_errors"].sum()) / calls if calls else 0.0
    del mean["tool_errors"]
    return {f"rollout/{k}": v for k, v in mean.items()}


def to_rollout(
    episodes: list[Episode], prompt_index: list[int], pad_id: int, extras=None
) -> Rollout:
    """The episodes as a Rollout: the first prompt left-padded, everything after it (turns and
    environment messages) as the response, masked to the model's ids, with their log-probs.
    An environment turn that ended an episode (no turn of the model after it) is left out:
    nothing after it is trained."""
    prompts = [e.transcript.ids[: e.prompt_length] for e in episodes]

    def response(name: str) -> list[list]:  # from the prompt's end to the last turn's
        return [
            getattr(e.transcript, name)[e.prompt_length : e.transcript.turn_spans[-1][1]]
            for e in episodes
        ]

    rest, masks, logps = response("ids"), response("mask"), response("logps")
    return Rollout(
        pad(prompts, pad_id, left=True),
        pad([[True] * len(p) for p in prompts], False, left=True, dtype=torch.bool),
        pad(rest, pad_id),
        pad(masks, False, dtype=torch.bool),
        pad(logps, 0.0, dtype=torch.float32),
        ["length" if e.end in ("truncated", "max_tokens") else "stop" for e in episodes],
        torch.tensor(prompt_index, dtype=torch.long),
        extras or {},
    )


def sample_episodes(
    make_env: Callable[[], Environment],
    tools: list[dict] | None,
    prompts,
    settings,
    generate: Callable,
    seed: int,
    tokenizer,
) -> Rollout:
    """An engine's rollout of a PromptBatch as episodes: n_samples_per_prompt episodes per row
    (each with its own environment), turns sampled by the backend's `generate` (engine_turns),
    the rollout with each row's counts in extras. With the single-turn environment this is
    the engine's own rollout, token for token (the first turn gets the same seed and batch)."""
    n = settings.n_samples_per_prompt
    limits = Limits(
        settings.environment.max_turns, settings.episode_tokens, settings.max_new_tokens
    )
    if len(prompts.rows) != len(prompts):
        raise ValueError(
            f"a prompt batch of {len(prompts)} prompts carries {len(prompts.rows)} rows: episodes "
            "start from each prompt's row (collate it with rlhf.data's prompt collator)"
        )
    mask = prompts.attention_mask.bool()
    ids = [row[m].tolist() for row, m in zip(prompts.input_ids, mask, strict=True)]
    rows = [row for row in prompts.rows for _ in range(n)]
    envs = [make_env() for _ in rows]
    pad_id = tokenizer.pad_token_id
    turns = engine_turns(generate, settings, seed, pad_id)
    episodes = run_episodes(
        envs, rows, tokenizer, turns, limits, tools, [x for x in ids for _ in range(n)]
    )
    index = prompts.index.repeat_interleave(n).tolist()
    return to_rollout(episodes, index, pad_id, episode_extras(episodes, tokenizer, tools))


def response_texts(r: Rollout, tokenizer) -> list[str]:
    """Each row's response text for the reward: a multi-turn episode's last turn (its
    answer), a single-turn response whole; special tokens dropped."""
    starts = r.extras.get("last_turn_start")
    rows = []
    for k, (row, m) in enumerate(zip(r.response_ids, r.response_mask.bool(), strict=True)):
        if starts is not None:
            row, m = row[int(starts[k]) :], m[int(starts[k]) :]
        rows.append(row[m].tolist())
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def episode_texts(r: Rollout, tokenizer) -> list[str] | None:
    """A multi-turn rollout's whole episodes after the prompt (tool calls, the environment's
    messages, template tokens kept), for the logs; None for a single-turn rollout."""
    if not r.extras:
        return None
    attended = response_attention(r.response_mask)
    rows = [row[m].tolist() for row, m in zip(r.response_ids, attended, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=False)
