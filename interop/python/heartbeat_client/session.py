"""One heartbeat session after another, until its owner closes it.

A ``Session`` runs as an asyncio task: it says ``Hello``, adopts the interval
and timeout of ``Welcome``, answers every server ``Ping`` at once, pings at the
interval and measures round trips. When the server falls silent for the
session's timeout, ends the stream, or says ``Goodbye``, the session is lost;
it reconnects after a jittered backoff, or after the server's
``reconnect_after`` hint when one came. ``close()`` says
``Goodbye{CLIENT_SHUTDOWN}`` and half-closes, so presence records a goodbye
rather than a disconnect.

When the server asks a live session to rotate (``Goodbye{ROTATE}``: the
session reached the server's maximum age, and its stream stays open for a
grace period), the session makes before it breaks: it opens a successor on a
new connection, with the same Hello, while the old stream keeps answering
pings. Once the successor is welcomed it reports ``Rotated`` instead of
``Connected`` and lets the old stream go; the server ends that one as
``REPLACED`` (the successor's Hello replaced it), which is the rotation's
normal end and never reported. The server replaces only sessions with a
client id, so an anonymous session leaves the old stream itself: it says
``Goodbye{CLIENT_SHUTDOWN}`` and half-closes, rather than let it linger to the
end of its grace and be recorded as ``ROTATED``; that end is not reported
either. If no successor can be opened, the old session carries on, and the
end of its grace (a second ``ROTATE``, then ``UNAVAILABLE``) is an ordinary
loss.

Frames are read by a task of their own into a queue, and the session waits on
that queue with a timeout: a frame that has arrived is always seen before the
silence it would end is declared.
"""

from __future__ import annotations

import asyncio
import enum
import math
from typing import AsyncIterator, Dict, Mapping, Optional, Set, Tuple, Union

import grpc

from . import pb
from ._channel import bearer, open_channel, seconds
from .backoff import Backoff
from .events import Closed, Connected, Lost, Reconnecting, Rotated, Rtt

Event = Union[Connected, Rotated, Rtt, Lost, Reconnecting, Closed]

_hb = pb.heartbeat

# Bounds on what a Welcome may set, and the interval used if it sets none.
_MIN_INTERVAL, _MAX_INTERVAL, _DEFAULT_INTERVAL = 0.01, 3600.0, 10.0
# The longest reconnect hint honoured.
_MAX_HINT = 600.0
# Frames queued towards the server; a full queue means a stuck transport,
# which the timeout notices.
_OUTBOUND = 16
# How long Hello waits for the response headers (see `_Call`).
_HEADERS_WAIT = 1.0
# Events kept for a reader that is behind; the oldest go first.
_EVENTS = 1024
# Reasons after which coming straight back would only repeat the offence.
_OBJECTIONS = {"GOODBYE_REASON_TOO_MANY_PINGS", "GOODBYE_REASON_PROTOCOL_VIOLATION", "GOODBYE_REASON_EVICTED"}
_REPLACED = "GOODBYE_REASON_REPLACED"
# Each call gets a connection of its own rather than one shared through
# gRPC's global subchannel pool: a rotation's successor, opened while the old
# session's channel is still up, must make a new connection, which a load
# balancer may send to another server.
_OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class _Turn(enum.Enum):
    """A conversation's run that stopped short of the session's end."""

    ROTATE = "rotate"
    """The server asked the live session to rotate; its stream is still open."""
    LIVE = "live"
    """A successor was welcomed (``run(until_live=True)``)."""


# What a conversation's run comes to: a loss, a close (``None``), or a turn.
_Outcome = Union[Lost, None, _Turn]


class Session:
    """A heartbeat session kept alive across losses.

    ``async with Session("127.0.0.1:50051", client_id="w1") as session:`` starts
    it; ``async for event in session.events()`` follows it; leaving the block
    (or ``await session.close()``) says goodbye.

    Events: ``Connected``, ``Rotated`` (moved to a successor when the server
    asked the session to rotate, instead of ``Connected``), ``Rtt``, ``Lost``,
    ``Reconnecting``, and ``Closed`` (the last).

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
        # The inbound queues of the calls a close must reach: the session's,
        # and during a rotation its successor's too.
        self._listening: Set[asyncio.Queue] = set()
        # Old sessions of rotations, answering pings until the server ends
        # them (or, for an anonymous client, saying goodbye).
        self._retiring: Set[asyncio.Task] = set()
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
        for inbound in self._listening:
            inbound.put_nowait(("close",))
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
            try:
                # Old sessions still retiring need no goodbye: their
                # successor's Hello has replaced them, or (anonymous) they
                # have said theirs.
                retiring = list(self._retiring)
                for task in retiring:
                    task.cancel()
                await asyncio.gather(*retiring, return_exceptions=True)
            finally:
                # Whatever ended the task, readers of events() see the end.
                self._emit(Closed(replaced=replaced))

    async def _sessions(self) -> bool:
        """One session after another until closed; true if replaced."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self._closing.is_set():
            lost, live_since, final = await self._attempt()
            self.session_id = None
            if lost is None:
                break
            self._emit(lost)
            if final:
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

    def _converse(self, rotated_from: Optional[str] = None) -> "_Conversation":
        """A new call and its conversation, which a close reaches from now on."""
        conversation = _Conversation(self, _Call(self), rotated_from)
        self._listening.add(conversation.inbound)
        return conversation

    async def _attempt(self) -> Tuple[Optional[Lost], Optional[float], bool]:
        """One session, from connect to loss or close, moving to a successor
        whenever the server asks it to rotate. Returns the loss (``None`` after
        a close), the time the session went live, and whether the loss is
        final: replaced by a newer session that is not this one's successor."""
        if self._closing.is_set():
            return None, None, False
        current = self._converse()
        try:
            outcome = await current.run()
            while isinstance(outcome, _Turn):
                current, outcome = await self._rotate(current)
                if outcome is _Turn.LIVE:
                    outcome = await current.run()
            # A session asked to rotate may be replaced by a successor that
            # then failed: that is no reason to stop for good.
            final = outcome is not None and outcome.goodbye == _REPLACED and not current.rotating
            return outcome, current.live_since, final
        finally:
            await current.close()

    async def _rotate(self, old: "_Conversation") -> Tuple["_Conversation", _Outcome]:
        """Make before break: opens a successor while ``old`` (asked to rotate,
        still open) goes on answering pings. Returns the successor and
        ``_Turn.LIVE`` once it is welcomed, or else ``old`` and how it ended."""
        if self._closing.is_set():
            # The close is queued for the old session, which says goodbye.
            return old, await old.run()
        successor = self._converse(rotated_from=old.session_id)
        old_run = asyncio.get_running_loop().create_task(old.run())
        try:
            handshake = await successor.run(until_live=True)
        except BaseException:
            old_run.cancel()
            await successor.close()
            raise
        if handshake is _Turn.LIVE:
            # The old session's own pings, deadline and events stop here.
            old_run.cancel()
            self._listening.discard(old.inbound)
            if self._hello.client_id:
                task = asyncio.get_running_loop().create_task(old.retire(old_run))
            else:
                # The server replaces only sessions with a client id: nothing
                # replaces an anonymous one, so it leaves now rather than
                # linger to the end of its grace and close as ROTATED.
                task = asyncio.get_running_loop().create_task(old.leave(old_run))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return successor, _Turn.LIVE
        await successor.close()
        # The old session goes on (awaited here, so that a cancel reaches it);
        # the end of its grace is its end. A close reached it too.
        outcome = await old_run
        if handshake is None:
            return old, None
        if isinstance(outcome, Lost) and outcome.goodbye == _REPLACED:
            # The successor's Hello reached the server, which replaced the
            # old session, and then the successor failed: its failure is the loss.
            return old, handshake
        return old, outcome


async def _read(call, inbound: asyncio.Queue) -> None:
    """Moves frames, then the final status, from ``call`` into ``inbound``."""
    try:
        async for response in call:
            inbound.put_nowait(("frame", response))
        inbound.put_nowait(("end", (await call.code()).name, await call.details() or ""))
    except grpc.aio.AioRpcError as error:
        inbound.put_nowait(("end", error.code().name, error.details() or ""))


class _Call:
    """One ``Heartbeat`` call on a channel of its own. ``inbound`` receives its
    frames and then its status (and ``("close",)`` from ``Session.close``);
    ``outbound`` holds the frames to send after Hello (``None`` half-closes)."""

    def __init__(self, session: Session) -> None:
        self.inbound: asyncio.Queue = asyncio.Queue()
        self.outbound: asyncio.Queue = asyncio.Queue(_OUTBOUND)
        hello = _hb.HeartbeatRequest(hello=session._hello)
        outbound = self.outbound

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

        self._channel = open_channel(session._target, session._credentials, _OWN_CONNECTION)
        call = pb.heartbeat_grpc.HeartbeatServiceStub(self._channel).Heartbeat(
            requests(), metadata=session._metadata
        )
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(_read(call, self.inbound))
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        self._reader.cancel()
        await self._channel.close(grace=None)


class _Conversation:
    """The frames of one session: what to answer, when to ping, when the server
    counts as lost."""

    def __init__(self, session: Session, call: _Call, rotated_from: Optional[str] = None) -> None:
        self._session = session
        self._call = call
        self.inbound = call.inbound
        self._outbound = call.outbound
        # The session this one succeeds, when it is a rotation's successor.
        self._rotated_from = rotated_from
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + session._handshake_timeout
        self._next_ping = math.inf
        self._interval = _DEFAULT_INTERVAL
        self.timeout = 3 * _DEFAULT_INTERVAL
        self._seq = 0
        self._sent: Dict[int, float] = {}
        self._goodbye = None
        self._rechecked = False
        self.live_since: Optional[float] = None
        """When the session went live (``Welcome``)."""
        self.session_id: Optional[str] = None
        self.rotating = False
        """Set once the server asked this session to rotate."""

    async def run(self, until_live: bool = False) -> _Outcome:
        """Runs the session until it ends (a ``Lost``), is closed (``None``) or
        is asked to rotate (``_Turn.ROTATE``); with ``until_live``, only until
        it is welcomed (``_Turn.LIVE``). A run that stopped at a turn can be
        run again to go on."""
        while True:
            wake = min(self._deadline, self._next_ping)
            try:
                item = await asyncio.wait_for(self.inbound.get(), max(0.0, wake - self._loop.time()))
            except asyncio.TimeoutError:
                now = self._loop.time()
                if now >= self._deadline:
                    if not self.inbound.empty():
                        continue
                    if not self._rechecked:
                        # This loop may have been held up: let the reader
                        # deliver what has arrived, then look once more
                        # before taking the server for silent.
                        self._rechecked = True
                        await asyncio.sleep(0)
                        continue
                    return self._silence()
                if now >= self._next_ping:
                    self._ping(now)
                continue
            self._rechecked = False
            if item[0] == "close":
                await self._say_goodbye()
                return None
            if item[0] == "end":
                return self._ended(item[1], item[2])
            turn = self._on_frame(item[1], self._loop.time())
            if turn is not None:
                return turn
            if until_live and self.live_since is not None:
                return _Turn.LIVE

    def _on_frame(self, response, now: float) -> Optional[_Turn]:
        kind = response.WhichOneof("frame")
        if self._goodbye is None:
            # Any server frame proves the server alive.
            self._deadline = now + (self.timeout if self.live_since else self._session._handshake_timeout)
        if kind == "welcome" and self.live_since is None:
            self._adopt(response.welcome, now)
        elif kind == "ping":
            self._send(_hb.HeartbeatRequest(pong=_hb.Pong(seq=response.ping.seq)))
        elif kind == "pong":
            sent = self._sent.pop(response.pong.seq, None)
            if sent is not None:
                self._measured(response.pong.seq, now - sent)
        elif (
            kind == "goodbye"
            and response.goodbye.reason == _hb.GOODBYE_REASON_ROTATE
            and self.live_since is not None
            and not self.rotating
            and not self._session._closing.is_set()
        ):
            # Asked to rotate: the stream stays open for the grace, so this is
            # no end, and pings go on; a second ask is the end of the grace.
            # (While closing, the close already queued says goodbye instead.)
            self.rotating = True
            return _Turn.ROTATE
        elif kind == "goodbye":
            # The status follows at once; wait a little for it, and ping no more.
            self._goodbye = response.goodbye
            self._next_ping = math.inf
            self._deadline = now + min(self.timeout, self._session._close_timeout)
        return None

    def _adopt(self, welcome, now: float) -> None:
        if welcome.HasField("ping_interval"):
            self._interval = min(max(seconds(welcome.ping_interval), _MIN_INTERVAL), _MAX_INTERVAL)
        timeout = seconds(welcome.timeout) if welcome.HasField("timeout") else 0.0
        # A timeout not longer than the interval would give up on the server
        # just as its next ping is due: take three intervals instead.
        self.timeout = min(timeout if timeout > self._interval else 3 * self._interval, 3 * _MAX_INTERVAL)
        self.live_since = now
        self._deadline = now + self.timeout
        if self._session._send_pings:
            self._next_ping = now + self._interval
        self.session_id = welcome.session_id
        self._session.session_id = welcome.session_id
        if self._rotated_from is None:
            self._session._emit(Connected(welcome.session_id, self._interval, self.timeout))
        else:
            self._session._emit(Rotated(self._rotated_from, welcome.session_id, self._interval, self.timeout))

    def _ping(self, now: float) -> None:
        self._seq += 1
        self._sent[self._seq] = now
        # Pings unanswered for a whole timeout will never be answered.
        for seq in [seq for seq, at in self._sent.items() if now - at > self.timeout]:
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
        if self.live_since is None:
            return Lost("timeout", message=f"no Welcome within {self._session._handshake_timeout:g} s")
        return Lost("timeout", message=f"no frame from the server for {self.timeout:g} s")

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
                item = await asyncio.wait_for(self.inbound.get(), left)
            except asyncio.TimeoutError:
                return
            if item[0] == "end":
                return

    async def retire(self, run: asyncio.Task) -> None:
        """After a rotation: stops ``run`` (this session's pings and
        deadline), then answers the server's pings until it ends the session
        (``REPLACED`` once the successor's Hello arrived, or ``ROTATED`` after
        the grace), at most one timeout long. Its end is no loss: it is not
        reported."""
        try:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            if not run.cancelled():
                # It ran to its end (the call ended while the successor was
                # being opened): nothing is left to answer.
                return
            end_by = self._loop.time() + self.timeout
            while (left := end_by - self._loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self.inbound.get(), left)
                except asyncio.TimeoutError:
                    return
                if item[0] == "end":
                    return
                if item[0] == "frame" and item[1].WhichOneof("frame") == "ping":
                    self._send(_hb.HeartbeatRequest(pong=_hb.Pong(seq=item[1].ping.seq)))
        finally:
            await self.close()

    async def leave(self, run: asyncio.Task) -> None:
        """After the rotation of an anonymous session, which no successor
        replaces: stops ``run`` (this session's pings and deadline), then says
        ``Goodbye{CLIENT_SHUTDOWN}``, half-closes, and waits (at most
        ``close_timeout``) for the server to end the call. Its end is no loss:
        it is not reported."""
        try:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            if not run.cancelled():
                # It ran to its end (the call ended, or a close already said
                # goodbye, while the successor was being opened).
                return
            await self._say_goodbye()
        finally:
            await self.close()

    async def close(self) -> None:
        """Ends the call (idempotent); a close no longer needs to reach it."""
        self._session._listening.discard(self.inbound)
        await self._call.close()
