"""A Python client for heartbeat.v1: sessions that stay alive and presence
watches that resume, on stubs generated from the project's ``.proto`` files.

Two ways in, one implementation:

- ``heartbeat_client.Session`` and ``heartbeat_client.PresenceWatcher`` are
  asyncio (``grpc.aio``) classes;
- ``heartbeat_client.sync`` drives the same classes from a thread of its own,
  for code that does not run an event loop.

``pb`` holds the generated message modules: ``pb.heartbeat`` (frames) and
``pb.presence`` (the presence view).
"""

from types import SimpleNamespace

from . import _stubs

_heartbeat, _heartbeat_grpc, _presence, _presence_grpc = _stubs.load()

pb = SimpleNamespace(
    heartbeat=_heartbeat,
    heartbeat_grpc=_heartbeat_grpc,
    presence=_presence,
    presence_grpc=_presence_grpc,
)
"""The generated modules."""

from .backoff import Backoff  # noqa: E402
from .events import (  # noqa: E402
    Closed,
    Connected,
    Interrupted,
    Lost,
    Opened,
    Reconnecting,
    Recovered,
    Reset,
    Rotated,
    Rtt,
    SessionClosed,
    Suspected,
    Synced,
)
from .presence import PresenceWatcher, WatchFailed  # noqa: E402
from .session import Session  # noqa: E402

__all__ = [
    "Backoff",
    "Closed",
    "Connected",
    "Interrupted",
    "Lost",
    "Opened",
    "PresenceWatcher",
    "Reconnecting",
    "Recovered",
    "Reset",
    "Rotated",
    "Rtt",
    "Session",
    "SessionClosed",
    "Suspected",
    "Synced",
    "WatchFailed",
    "pb",
]
