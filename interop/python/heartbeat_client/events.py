"""What sessions and watchers report, as small immutable records.

Times are in seconds (floats), as asyncio counts them. Reasons and status
codes are the contract's names (``GOODBYE_REASON_TIMEOUT``,
``DEADLINE_EXCEEDED``, ``CLOSE_REASON_CLIENT_GOODBYE``), so a log line reads
the same in every language.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

# --- a session's events ---


@dataclass(frozen=True)
class Connected:
    """A session opened: the server answered ``Hello`` with ``Welcome``."""

    session_id: str
    ping_interval: float
    timeout: float


@dataclass(frozen=True)
class Rotated:
    """The server asked the session to rotate (``Goodbye{ROTATE}``: it reached
    the server's maximum age), and the client moved to a successor before
    leaving it (make-before-break): no loss, and presence never showed the
    client id missing. The successor may be on another server; its
    ``ping_interval`` and ``timeout`` are the ones now in force."""

    from_session_id: str
    to_session_id: str
    ping_interval: float
    timeout: float


@dataclass(frozen=True)
class Rtt:
    """The server answered the client's ``Ping{seq}``: one round-trip sample,
    and the smoothed value (as TCP's SRTT, gain 1/8)."""

    seq: int
    rtt: float
    smoothed: float


@dataclass(frozen=True)
class Lost:
    """The session ended without the client asking.

    ``kind`` is ``"timeout"`` (no server frame for the session's timeout, or no
    ``Welcome`` within the handshake timeout), ``"goodbye"`` (the server said
    why: ``goodbye`` and ``reconnect_after``), or ``"status"`` (the call ended
    with a status and no goodbye: refused, unreachable, reset). ``code`` is the
    final gRPC status when there was one.
    """

    kind: str
    code: Optional[str] = None
    message: str = ""
    goodbye: Optional[str] = None
    reconnect_after: Optional[float] = None


@dataclass(frozen=True)
class Reconnecting:
    """The session will try again after ``delay`` seconds (attempt from 1)."""

    attempt: int
    delay: float


@dataclass(frozen=True)
class Closed:
    """The session is over for good: closed by its owner (after its goodbye),
    or replaced by a newer session with the same client id (never by its own
    successor during a rotation)."""

    replaced: bool = False


# --- a presence watcher's events (each carries the revision it reports) ---


@dataclass(frozen=True)
class Opened:
    """A session opened (or was in the snapshot)."""

    session: Any
    revision: int


@dataclass(frozen=True)
class SessionClosed:
    """A session ended; ``reason`` is its ``CloseReason`` name."""

    session: Any
    reason: str
    message: str
    revision: int


@dataclass(frozen=True)
class Suspected:
    """A session is late: still open, no client frame for ``suspect_after``."""

    session: Any
    revision: int


@dataclass(frozen=True)
class Recovered:
    """A suspect session's client spoke again."""

    session: Any
    revision: int


@dataclass(frozen=True)
class Synced:
    """The view is complete as of ``revision`` of the server's ``epoch``."""

    epoch: int
    revision: int


@dataclass(frozen=True)
class Reset:
    """The server could not replay what the watcher missed: the view was
    dropped and a snapshot follows."""

    revision: int


@dataclass(frozen=True)
class Interrupted:
    """The watch stream broke with ``code``; it resumes from the last revision
    seen after ``retry_in`` seconds."""

    code: str
    message: str
    retry_in: float
