"""One heartbeat session after another, until its owner closes it.

A ``Session`` runs as an asyncio task: it says ``Hello``, adopts the interval
and timeout of ``Welcome``, answers every server ``Ping`` at once, pings at the
interval and measures round trips. When the server falls silent for the
session's timeout, ends the stream, or says ``Goodbye``, the session is lost;
it reconnects after a jittered backoff, or after the server's
``reconnect_after`` hint when one came. ``close()`` says
``Goodbye{CLIENT_SHUTDOWN}`` and half-closes, so presence records a goodbye
rather than a disconnect.

Frames are read by a task of their own into a queue, and the session waits on
that queue with a timeout: a frame that has arrived is always seen before the
silence it would end is declared.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Dict, Mapping, Optional, Tuple, Union

import grpc

from . import pb
from ._channel import bearer, open_channel, seconds
from .backoff import Backoff
from .events import Closed, Connected, Lost, Reconnecting, Rtt

Event = Union[Connected, Rtt, Lost, Reconnecting, Closed]

_hb = pb.heartbeat

# Bounds on what a Welcome may set, and the interval used if it sets none.
_MIN_INTERVAL, _MAX_INTERVAL, _DEFAULT_INTERVAL = 0.01, 3600.0, 10.0
# The longest reconnect hint honoured.
_MAX_HINT = 600.0
# Frames queued towards the server; a full queue means a stuck transport,
# which the timeout notices.
_OUTBOUND = 16
# How long Hello waits for the response headers (see `_attempt`).
_HEADERS_WAIT = 1.0
# Events kept for a reader that is behind; the oldest go first.
_EVENTS = 1024
# Reasons after which coming straight back would only repeat the offence.
_OBJECTIONS = {"GOODBYE_REASON_TOO_MANY_PINGS", "GOODBYE_REASON_PROTOCOL_VIOLATION", "GOODBYE_REASON_EVICTED"}


class Session:
    """A heartbeat session kept alive across losses.

    ``async with Session("127.0.0.1:50051", client_id="w1") as session:`` starts
    it; ``async for event in session.events()`` follows it; leaving the block
    (or ``await session.close()``) says goodbye.

    ``credentials`` are ``grpc.ChannelCredentials`` for TLS; ``token`` is a
    client credential sent as ``authorization: Bearer``. With
    ``send_pings=False`` the session only answers the server's pings, which
    keeps it alive but measures no round trips.
    """

    def __init__(
        self,
        target: str,
        client_id: str = "",
        labels: Optional[Mapping[str, str]] = None,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        token: Optional[str] = None,
        send_pings: bool = True,
        backoff: Backoff = Backoff(),
        handshake_timeout: float = 10.0,
        close_timeout: float = 2.0,
    ) -> None:
        self._target = target
        self._hello = _hb.Hello(client_id=client_id, labels=dict(labels or {}))
        self._credentials = credentials
        self._metadata = bearer(token)
        self._send_pings = send_pings
        self._backoff = backoff
        self._handshake_timeout = handshake_timeout
        self._close_timeout = close_timeout
        self._events: asyncio.Queue = asyncio.Queue(_EVENTS)
        self._closing = asyncio.Event()
        self._inbound: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self.session_id: Optional[str] = None
        """The open session's id, or ``None`` between sessions."""
        self.rtt: Optional[float] = None
        """The smoothed round-trip time in seconds, once measured."""

    async def __aenter__(self) -> "Session":
        self.start()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    def start(self) -> None:
        """Starts the session's task on the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def events(self) -> AsyncIterator[Event]:
        """The session's events, ending with ``Closed``."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Closed):
                return

    async def close(self) -> None:
        """Says ``Goodbye{CLIENT_SHUTDOWN}``, half-closes, and waits (at most
        ``close_timeout``) for the server to finish the call."""
        self._closing.set()
        if self._inbound is not None:
            self._inbound.put_nowait(("close",))
        if self._task is not None:
            await self._task

    def _emit(self, event: Event) -> None:
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(event)

    async def _run(self) -> None:
        replaced = False
        try:
            replaced = await self._sessions()
        finally:
            # Whatever ended the task, readers of events() see the end.
            self._emit(Closed(replaced=replaced))

    async def _sessions(self) -> bool:
        """One session after another until closed; true if replaced."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self._closing.is_set():
            lost, live_since = await self._attempt()
            self.session_id = None
            if lost is None:
                break
            self._emit(lost)
            if lost.goodbye == "GOODBYE_REASON_REPLACED":
                # A newer session with this client id took over: coming back
                # would only replace it in turn.
                return True
            if self._closing.is_set():
                break
            if live_since is not None and loop.time() - live_since >= self._backoff.reset_after:
                attempt = 0
            attempt += 1
            delay = self._retry_delay(lost, attempt)
            self._emit(Reconnecting(attempt, delay))
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
            except asyncio.TimeoutError:
                pass
        return False

    def _retry_delay(self, lost: Lost, attempt: int) -> float:
        if lost.reconnect_after is not None:
            return self._backoff.after_hint(min(lost.reconnect_after, _MAX_HINT))
        if lost.goodbye in _OBJECTIONS:
            return self._backoff.after_objection()
        # Anything else, a reason newer than this client included (which the
        # contract says to treat like a shutdown): the usual backoff.
        return self._backoff.delay(attempt)

    async def _attempt(self) -> Tuple[Optional[Lost], Optional[float]]:
        """One session, from connect to loss (returned, with the time it went
        live) or close (``None``)."""
        inbound: asyncio.Queue = asyncio.Queue()
        self._inbound = inbound
        if self._closing.is_set():
            return None, None
        outbound: asyncio.Queue = asyncio.Queue(_OUTBOUND)
        hello = _hb.HeartbeatRequest(hello=self._hello)

        async def requests():
            # Hello waits for the response headers, which the server sends at
            # once on a stream it admits. A stream refused at admission gets
            # its status instead, and a write into it could make grpcio's
            # asyncio API report INTERNAL in place of that status
            # (grpc/grpc#36066). Behind a proxy that holds headers back, Hello
            # goes after a second anyway.
            try:
                await asyncio.wait_for(asyncio.shield(call.initial_metadata()), _HEADERS_WAIT)
            except asyncio.TimeoutError:
                pass
            if call.done():
                return
            yield hello
            while (request := await outbound.get()) is not None:
                yield request

        channel = open_channel(self._target, self._credentials)
        call = pb.heartbeat_grpc.HeartbeatServiceStub(channel).Heartbeat(
            requests(), metadata=self._metadata
        )
        reader = asyncio.get_running_loop().create_task(_read(call, inbound))
        try:
            return await _Conversation(self, inbound, outbound).run()
        finally:
            self._inbound = None
            call.cancel()
            reader.cancel()
            await channel.close(grace=None)


async def _read(call, inbound: asyncio.Queue) -> None:
    """Moves frames, then the final status, from ``call`` into ``inbound``."""
    try:
        async for response in call:
            inbound.put_nowait(("frame", response))
        inbound.put_nowait(("end", (await call.code()).name, await call.details() or ""))
    except grpc.aio.AioRpcError as error:
        inbound.put_nowait(("end", error.code().name, error.details() or ""))


class _Conversation:
    """The frames of one session: what to answer, when to ping, when the server
    counts as lost."""

    def __init__(self, session: Session, inbound: asyncio.Queue, outbound: asyncio.Queue) -> None:
        self._session = session
        self._inbound = inbound
        self._outbound = outbound
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + session._handshake_timeout
        self._next_ping = math.inf
        self._interval = _DEFAULT_INTERVAL
        self._timeout = 3 * _DEFAULT_INTERVAL
        self._seq = 0
        self._sent: Dict[int, float] = {}
        self._goodbye = None
        self._live_since: Optional[float] = None

    async def run(self) -> Tuple[Optional[Lost], Optional[float]]:
        rechecked = False
        while True:
            wake = min(self._deadline, self._next_ping)
            try:
                item = await asyncio.wait_for(self._inbound.get(), max(0.0, wake - self._loop.time()))
            except asyncio.TimeoutError:
                now = self._loop.time()
                if now >= self._deadline:
                    if not self._inbound.empty():
                        continue
                    if not rechecked:
                        # This loop may have been held up: let the reader
                        # deliver what has arrived, then look once more
                        # before taking the server for silent.
                        rechecked = True
                        await asyncio.sleep(0)
                        continue
                    return self._silence(), self._live_since
                if now >= self._next_ping:
                    self._ping(now)
                continue
            rechecked = False
            if item[0] == "close":
                await self._say_goodbye()
                return None, self._live_since
            if item[0] == "end":
                return self._ended(item[1], item[2]), self._live_since
            self._on_frame(item[1], self._loop.time())

    def _on_frame(self, response, now: float) -> None:
        kind = response.WhichOneof("frame")
        if self._goodbye is None:
            # Any server frame proves the server alive.
            self._deadline = now + (self._timeout if self._live_since else self._session._handshake_timeout)
        if kind == "welcome" and self._live_since is None:
            self._adopt(response.welcome, now)
        elif kind == "ping":
            self._send(_hb.HeartbeatRequest(pong=_hb.Pong(seq=response.ping.seq)))
        elif kind == "pong":
            sent = self._sent.pop(response.pong.seq, None)
            if sent is not None:
                self._measured(response.pong.seq, now - sent)
        elif kind == "goodbye":
            # The status follows at once; wait a little for it, and ping no more.
            self._goodbye = response.goodbye
            self._next_ping = math.inf
            self._deadline = now + min(self._timeout, self._session._close_timeout)

    def _adopt(self, welcome, now: float) -> None:
        if welcome.HasField("ping_interval"):
            self._interval = min(max(seconds(welcome.ping_interval), _MIN_INTERVAL), _MAX_INTERVAL)
        timeout = seconds(welcome.timeout) if welcome.HasField("timeout") else 0.0
        # A timeout not longer than the interval would give up on the server
        # just as its next ping is due: take three intervals instead.
        self._timeout = min(timeout if timeout > self._interval else 3 * self._interval, 3 * _MAX_INTERVAL)
        self._live_since = now
        self._deadline = now + self._timeout
        if self._session._send_pings:
            self._next_ping = now + self._interval
        self._session.session_id = welcome.session_id
        self._session._emit(Connected(welcome.session_id, self._interval, self._timeout))

    def _ping(self, now: float) -> None:
        self._seq += 1
        self._sent[self._seq] = now
        # Pings unanswered for a whole timeout will never be answered.
        for seq in [seq for seq, at in self._sent.items() if now - at > self._timeout]:
            del self._sent[seq]
        self._send(_hb.HeartbeatRequest(ping=_hb.Ping(seq=self._seq)))
        self._next_ping = now + self._interval

    def _measured(self, seq: int, rtt: float) -> None:
        session = self._session
        session.rtt = rtt if session.rtt is None else session.rtt + (rtt - session.rtt) / 8
        session._emit(Rtt(seq, rtt, session.rtt))

    def _send(self, request) -> None:
        try:
            self._outbound.put_nowait(request)
        except asyncio.QueueFull:
            pass

    def _silence(self) -> Lost:
        if self._goodbye is not None:
            return self._ended(None, "")
        if self._live_since is None:
            return Lost("timeout", message=f"no Welcome within {self._session._handshake_timeout:g} s")
        return Lost("timeout", message=f"no frame from the server for {self._timeout:g} s")

    def _ended(self, code: Optional[str], details: str) -> Lost:
        goodbye = self._goodbye
        if goodbye is None:
            return Lost("status", code=code, message=details)
        return Lost(
            "goodbye",
            code=code,
            message=goodbye.message,
            goodbye=_hb.GoodbyeReason.Name(goodbye.reason)
            if goodbye.reason in _hb.GoodbyeReason.values()
            else f"GOODBYE_REASON_{goodbye.reason}",
            reconnect_after=seconds(goodbye.reconnect_after) if goodbye.HasField("reconnect_after") else None,
        )

    async def _say_goodbye(self) -> None:
        # Also before Welcome: Hello may have reached the server, and frames
        # keep their order, so the server reads the goodbye after it.
        while not self._outbound.empty():
            self._outbound.get_nowait()
        goodbye = _hb.Goodbye(reason=_hb.GOODBYE_REASON_CLIENT_SHUTDOWN)
        self._outbound.put_nowait(_hb.HeartbeatRequest(goodbye=goodbye))
        self._outbound.put_nowait(None)
        end_by = self._loop.time() + self._session._close_timeout
        while (left := end_by - self._loop.time()) > 0:
            try:
                item = await asyncio.wait_for(self._inbound.get(), left)
            except asyncio.TimeoutError:
                return
            if item[0] == "end":
                return
