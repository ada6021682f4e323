"""Reward functions for tests (importable as tests.reward_fns:NAME)."""


def count_great(prompts, responses):
    return [r.count("great") for r in responses]


def wrong_length(prompts, responses):
    return [0.0]


def not_finite(prompts, responses):
    return [float("nan")] * len(responses)


def letter_e(prompts, responses):
    """A dense, learnable reward: the fraction of characters that are the letter 'e'."""
    return [r.count("e") / max(1, len(r)) for r in responses]


def positive_words(prompts, responses):
    """+1 per positive and -1 per negative word of the builtin review vocabulary."""
    from rlhf.data.synthetic import _NEGATIVE, _POSITIVE

    out = []
    for r in responses:
        words = [w.strip(".,!?").lower() for w in r.split()]
        out.append(float(sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)))
    return out


def by_kind(prompts, responses, kind):
    """Reads the prompt row's `kind` field: 'flat' rows score 0 whatever the response (a group
    with no signal), 'varied' rows a number that differs between responses."""
    return [
        0.0 if k == "flat" else float(sum(map(ord, r)) % 7)
        for r, k in zip(responses, kind, strict=True)
    ]
