"""Multi-turn episodes (pure: no Ray): environments and a turn generator in, token-exact
transcripts out, and from them the rollout the trainer takes.

`run_episodes` drives a batch of episodes turn by turn: the generator produces one assistant
turn for every episode still running (from its assembled ids, within its remaining token
budget), each turn is appended as generated, the environment answers it (every finished turn,
so its counts and rewards include the last one), and its messages are appended as template
ids. An episode ends when the environment says done (the answer), when a turn is cut at its
token budget, at `max_turns` (the environment's last messages dropped), or when the next turn
would have no tokens left (`max_total_tokens` over the whole episode after the prompt).

Turns are generated batch by batch: an episode whose turn ended early waits for the batch's
slowest turn before its environment steps (per-episode scheduling is the engines' next step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.data.collate import pad
from rlhf.envs import Environment
from rlhf.rollout import Rollout
from rlhf.transcripts import Transcript, add_environment, add_turn, retokenize_mismatch, start

#: (each running episode's ids, its token budget for this turn) -> per episode (generated ids,
#: the engine's log-prob of each, whether the turn ended with EOS).
TurnGenerator = Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float], bool]]]


@dataclass(frozen=True)
class Limits:
    max_turns: int = 1
    """Assistant turns per episode."""
    max_total_tokens: int = 256
    """Tokens after the prompt (the model's and the environment's) per episode: no turn of the
    model goes past it; an environment turn that reaches it ends the episode (its template
    ids are kept whole, so they may pass it)."""


@dataclass
class Episode:
    transcript: Transcript
    prompt_length: int
    end: str = ""
    """answer (the environment said done), truncated (a turn cut at its budget), max_turns,
    max_tokens (no budget left for another turn)."""
    rewards: list[float] = field(default_factory=list)
    """Per-turn rewards the environment gave (none: the episode's reward comes from roles.reward)."""
    tool_calls: float = 0.0
    tool_errors: float = 0.0

    @property
    def used(self) -> int:
        return len(self.transcript.ids) - self.prompt_length


def run_episodes(
    envs: list[Environment],
    rows: list[Mapping[str, Any]],
    tokenizer,
    generate: TurnGenerator,
    limits: Limits,
    tools: list[dict] | None = None,
) -> list[Episode]:
    """One episode per (environment, row), run to its end (see the module docstring)."""
    episodes = []
    for env, row in zip(envs, rows, strict=True):
        t = start(tokenizer, env.reset(row), tools)
        episodes.append(Episode(t, len(t.ids)))
    running = list(range(len(episodes)))
    while running:
        budgets = [limits.max_total_tokens - episodes[i].used for i in running]
        turns = generate([episodes[i].transcript.ids for i in running], budgets)
        still = []
        for i, (ids, logps, finished) in zip(running, turns, strict=True):
            e = episodes[i]
            text = add_turn(e.transcript, tokenizer, ids, logps, finished)
            if not finished:
                e.end = "truncated"
                continue
            step = envs[i].step(text)
            e.tool_calls += step.info.get("tool_calls", 0.0)
            e.tool_errors += step.info.get("tool_errors", 0.0)
            if step.reward is not None:
                e.rewards.append(float(step.reward))
            if step.done:
                e.end = "answer"
            elif e.transcript.turns >= limits.max_turns:
                e.end = "max_turns"
            else:
                add_environment(e.transcript, tokenizer, step.messages, tools)
                if e.used >= limits.max_total_tokens:
                    e.end = "max_tokens"
                else:
                    still.append(i)
        running = still
    return episodes


def engine_turns(generate: Callable, settings, seed: int, pad_id: int) -> TurnGenerator:
    """A TurnGenerator over an engine backend's `generate(PromptBatch, RolloutConfig, seed) ->
    Rollout` (the HF and vLLM backends): the running episodes' ids left-padded into one batch,
    one sample each, up to the largest budget; a turn longer than its own budget is cut there
    (then unfinished). Each call gets the next seed."""
    from rlhf.types import PromptBatch

    calls = [0]

    def turns(batch: list[list[int]], budgets: list[int]):
        prompts = PromptBatch(
            pad(batch, pad_id, left=True),
            pad([[1] * len(ids) for ids in batch], 0, left=True),
            torch.arange(len(batch)),
        )
        sampling = settings.model_copy(
            update={"n_samples_per_prompt": 1, "max_new_tokens": max(budgets)}
        )
        r = generate(prompts, sampling, seed + calls[0])
        calls[0] += 1
        out = []
        for i, budget in enumerate(budgets):
            keep = r.response_mask[i].bool()
            ids, logps = r.response_ids[i][keep].tolist(), r.logps[i][keep].tolist()
            finished = r.finish[i] == "stop" and len(ids) <= budget
            out.append((ids[:budget], logps[:budget], finished))
        return out

    return turns


def episode_metrics(episodes: list[Episode], tokenizer, tools=None) -> dict[str, float]:
    """rollout/turns, /tool_calls (per episode), /tool_error_rate (errors per call),
    /episode_tokens (after the prompt), /truncated (fraction cut by a token limit) and
    /retokenize_mismatch (fraction whose ids differ from a re-encoding of the conversation)."""
    n = len(episodes)
    calls = sum(e.tool_calls for e in episodes)
    drift = sum(retokenize_mismatch(e.transcript, tokenizer, tools) is not None for e in episodes)
    return {
        "rollout/turns": sum(e.transcript.turns for e in episodes) / n,
        "rollout/tool_calls": calls / n,
        "rollout/tool_error_rate": sum(e.tool_errors for e in episodes) / calls if calls else 0.0,
        "rollout/episode_tokens": sum(e.used for e in episodes) / n,
        "rollout/truncated": sum(e.end in ("truncated", "max_tokens") for e in episodes) / n,
        "rollout/retokenize_mismatch": drift / n,
    }


def to_rollout(episodes: list[Episode], prompt_index: list[int], pad_id: int) -> Rollout:
    """The episodes as a Rollout: the first prompt left-padded, everything after it (turns and
    environment messages) as the response, masked to the model's ids, with their log-probs."""
    prompts = [e.transcript.ids[: e.prompt_length] for e in episodes]
    rest = [e.transcript.ids[e.prompt_length :] for e in episodes]
    masks = [e.transcript.mask[e.prompt_length :] for e in episodes]
    logps = [e.transcript.logps[e.prompt_length :] for e in episodes]
    return Rollout(
        pad(prompts, pad_id, left=True),
        pad([[True] * len(p) for p in prompts], False, left=True, dtype=torch.bool),
        pad(rest, pad_id),
        pad(masks, False, dtype=torch.bool),
        pad(logps, 0.0, dtype=torch.float32),
        ["length" if e.end in ("truncated", "max_tokens") else "stop" for e in episodes],
        torch.tensor(prompt_index, dtype=torch.long),
    )
