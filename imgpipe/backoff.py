"""Bounded exponential backoff with jitter, for retrying a database or broker call.

Used wherever imgpipe waits out an outage (stage workers, the ingest consumer, control
tasks): the wait doubles per try from ``base_s`` up to ``max_s``, so the end of an outage
is noticed within ``max_s``, and jitter spreads the processes that failed together.
"""

from __future__ import annotations

import random

__all__ = ["Backoff", "backoff_delay_s"]

_MAX_EXPONENT = 30


def backoff_delay_s(
    tries: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """The wait before try ``tries + 1`` (``tries`` failed so far, from 0): "equal jitter",
    half of ``min(max_s, base_s * 2**tries)`` plus a random part up to the other half."""
    capped = min(max_s, base_s * 2 ** min(max(tries, 0), _MAX_EXPONENT))
    return float(capped / 2 + (rng or random).uniform(0, capped / 2))


class Backoff:
    """The waits of one run of failures; ``reset`` after a success."""

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError(
                f"backoff needs 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}; "
                "check IMGPIPE_OUTAGE_BACKOFF_S and IMGPIPE_OUTAGE_BACKOFF_MAX_S"
            )
        self.base_s = base_s
        self.max_s = max_s
        self.tries = 0
        self._rng = rng

    def next_s(self) -> float:
        delay_s = backoff_delay_s(self.tries, self.base_s, self.max_s, self._rng)
        self.tries += 1
        return delay_s

    def reset(self) -> None:
        self.tries = 0
