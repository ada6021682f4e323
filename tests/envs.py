"""Environments for tests (importable as tests.envs:NAME)."""

from __future__ import annotations

from rlhf.envs import Step, prompt_messages


class Nudge:
    """Asks for more after each of the model's turns, with a reward of `per_turn` each time,
    until `turns` turns are done: episodes of a known length and environment reward."""

    def __init__(self, turns: int = 2, per_turn: float = 0.1):
        self.turns, self.per_turn, self.seen = turns, per_turn, 0

    def reset(self, row):
        return prompt_messages(row)

    def step(self, assistant: str) -> Step:
        self.seen += 1
        done = self.seen >= self.turns
        return Step([] if done else [{"role": "user", "content": "Go on."}], self.per_turn, done)
