"""Reconnect delays: exponential, capped, with full jitter.

Full jitter (a uniform draw between zero and the exponential ceiling) spreads a
fleet of clients that lost the same server over the whole window, so the
server is not hit by all of them at once when it comes back. The policy is the
Rust client's, so clients in every language back off alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays drawn from ``[0, min(cap, base * 2**(attempt - 1))]`` seconds; a
    session that stayed live for ``reset_after`` seconds starts the count again."""

    base: float = 0.2
    cap: float = 15.0
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"Backoff.base is {self.base}; it must be greater than 0")
        if self.cap < self.base:
            raise ValueError(f"Backoff.cap ({self.cap}) must not be less than base ({self.base})")

    def delay(self, attempt: int) -> float:
        """A delay for attempt ``attempt`` (from 1)."""
        ceiling = min(self.cap, self.base * 2 ** min(max(attempt - 1, 0), 31))
        return random.uniform(0, ceiling)

    def after_hint(self, hint: float) -> float:
        """The wait after a server's ``reconnect_after`` hint: the hint, plus a
        jitter of up to half as long again (at least ``base``), so a fleet told
        the same hint does not return at the same instant."""
        return hint + random.uniform(0, max(hint / 2, self.base))

    def after_objection(self) -> float:
        """The wait after the server objected to this client (too many pings, a
        protocol violation, an eviction): coming straight back would repeat it."""
        return self.cap / 2 + random.uniform(0, self.cap / 2)
