"""A presence watch that keeps a view of the open sessions and survives a
broken stream.

The watcher remembers the server's epoch and the last revision it saw. When
its stream breaks, it asks again with ``resume_epoch`` and ``resume_after``:
a server that still holds every change since then replays exactly those
(nothing missed, nothing twice, no snapshot); otherwise it sends ``reset``
and a fresh snapshot, and the view starts over. Either way the view ends up
equal to the server's.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Dict, Mapping, Optional, Union

import grpc

from . import pb
from ._channel import bearer, open_channel
from .backoff import Backoff
from .events import Interrupted, Opened, Recovered, Reset, SessionClosed, Suspected, Synced

WatchEvent = Union[Opened, SessionClosed, Suspected, Recovered, Synced, Reset, Interrupted]

# Statuses that asking again cannot fix.
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


class WatchFailed(Exception):
    """The server refused the watch in a way retrying cannot fix (a missing
    admin token, a bad filter)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"the presence watch was refused: {code.name}: {details}")
        self.code = code
        self.details = details


class PresenceWatcher:
    """Follows ``WatchSessions`` and keeps ``sessions`` (by session id) equal to
    the server's view, filtered by ``client_id`` and ``labels``.

    ``async for event in watcher.events():`` runs it; each event has already
    been applied to ``sessions`` when it is yielded. ``epoch`` and ``revision``
    say which view ``sessions`` is.
    """

    def __init__(
        self,
        target: str,
        *,
        client_id: str = "",
        labels: Optional[Mapping[str, str]] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        admin_token: Optional[str] = None,
        backoff: Backoff = Backoff(),
    ) -> None:
        self._target = target
        self._filter = (client_id, dict(labels or {}))
        self._credentials = credentials
        self._metadata = bearer(admin_token)
        self._backoff = backoff
        self.sessions: Dict[str, object] = {}
        """The open sessions (``heartbeat.v1.Session`` messages) by id."""
        self.epoch = 0
        """The server's epoch, once synced (0 before)."""
        self.revision = 0
        """The revision of the last change applied."""

    async def events(self) -> AsyncIterator[WatchEvent]:
        """The watch's events, forever; raises ``WatchFailed`` on a refusal
        that retrying cannot fix."""
        attempt = 0
        while True:
            if self.epoch == 0:
                # Never synced: what comes is a whole snapshot again.
                self.sessions.clear()
            client_id, labels = self._filter
            request = pb.presence.WatchSessionsRequest(
                client_id=client_id,
                labels=labels,
                resume_epoch=self.epoch,
                resume_after=self.revision,
            )
            async with open_channel(self._target, self._credentials) as channel:
                stub = pb.presence_grpc.PresenceServiceStub(channel)
                call = stub.WatchSessions(request, metadata=self._metadata)
                try:
                    async for response in call:
                        event = self._apply(response)
                        if isinstance(event, Synced):
                            attempt = 0
                        if event is not None:
                            yield event
                    code, details = await call.code(), await call.details()
                except grpc.aio.AioRpcError as error:
                    code, details = error.code(), error.details() or ""
            if code in _FATAL:
                raise WatchFailed(code, details)
            attempt += 1
            delay = self._backoff.delay(attempt)
            yield Interrupted(code.name, details, delay)
            await asyncio.sleep(delay)

    def _apply(self, response) -> Optional[WatchEvent]:
        revision = response.revision
        kind = response.WhichOneof("event")
        self.revision = revision
        if kind == "opened":
            self.sessions[response.opened.session_id] = response.opened
            return Opened(response.opened, revision)
        if kind == "closed":
            closed = response.closed
            self.sessions.pop(closed.session.session_id, None)
            known = closed.reason in pb.presence.CloseReason.values()
            reason = pb.presence.CloseReason.Name(closed.reason) if known else f"CLOSE_REASON_{closed.reason}"
            return SessionClosed(closed.session, reason, closed.message, revision)
        if kind == "suspected":
            session = response.suspected.session
            self.sessions[session.session_id] = session
            return Suspected(session, revision)
        if kind == "recovered":
            session = response.recovered.session
            self.sessions[session.session_id] = session
            return Recovered(session, revision)
        if kind == "synced":
            self.epoch = response.synced.epoch
            return Synced(self.epoch, revision)
        if kind == "reset":
            # Until the snapshot that follows is synced, this watcher has no
            # view to resume from: a break before `synced` asks afresh.
            self.sessions.clear()
            self.epoch = 0
            return Reset(revision)
        # An event newer than this client: its revision counts, nothing else.
        return None
