"""Say a thing once per process: a fast path that turns itself off must say so, with its reason,
the first time (not at every step, and never silently)."""

from __future__ import annotations

import logging

_said: set[tuple[str, str]] = set()


def warn_once(log: logging.Logger, key: str, message: str) -> bool:
    """log.warning(message) the first time `key` is seen by this logger in this process;
    returns whether it was logged."""
    if (log.name, key) in _said:
        return False
    _said.add((log.name, key))
    log.warning(message)
    return True
