"""The asyncio classes, for code without an event loop.

``sync.Session`` and ``sync.PresenceWatcher`` run their asyncio namesakes on
an event loop in a thread of their own; each event is fetched on that loop
when the caller asks for it. There is one implementation of the protocol;
this module only moves calls and events between threads.

    with heartbeat_client.sync.Session("127.0.0.1:50051", client_id="w1") as session:
        for event in session.events():
            print(event)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable, Iterator

from . import presence, session

class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self._stopping = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="heartbeat-client", daemon=True)
        self._thread.start()

    def run(self, coroutine) -> Any:
        """Runs ``coroutine`` on the loop and waits for its result."""
        if self._stopping:
            coroutine.close()
            raise RuntimeError("this client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stream(self, make_iterator: Callable[[], Any]) -> Iterator[Any]:
        """Yields the items of the async iterator ``make_iterator()``, each
        fetched on the loop when asked for: the async side never runs ahead,
        so state it keeps (a watcher's view) matches the last item yielded."""
        iterator = make_iterator()
        try:
            while True:
                try:
                    item = self.run(iterator.__anext__())
                except (StopAsyncIteration, concurrent.futures.CancelledError):
                    # Ended, or cancelled by stop() from another thread.
                    return
                yield item
        finally:
            if not self._stopping:
                self.run(iterator.aclose())

    def stop(self) -> None:
        """Cancels what still runs on the loop (a thread waiting for an event
        sees the stream end), closes async generators and their channels, and
        ends the thread."""
        self._stopping = True
        asyncio.run_coroutine_threadsafe(_cancel_everything(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_everything() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class _OnItsOwnLoop:
    """What both wrappers share: the loop thread, ``with`` blocks, and a
    close that runs a farewell on the loop before stopping it."""

    def __init__(self) -> None:
        self._thread = _LoopThread()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _farewell(self):
        """A coroutine to run on the loop before it stops, or ``None``."""
        return None

    def close(self) -> None:
        """Stops the thread, after the farewell."""
        if self._thread is not None:
            farewell = self._farewell()
            if farewell is not None:
                self._thread.run(farewell)
            self._thread.stop()
            self._thread = None


class Session(_OnItsOwnLoop):
    """``heartbeat_client.Session`` for synchronous code; the same arguments.
    It starts at once; ``close()`` (or leaving a ``with`` block) says goodbye,
    waits for the session to end, and stops the thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

        async def start() -> session.Session:
            started = session.Session(*args, **kwargs)
            started.start()
            return started

        self._session = self._thread.run(start())

    @property
    def session_id(self):
        """The open session's id, or ``None`` between sessions."""
        return self._session.session_id

    @property
    def rtt(self):
        """The smoothed round-trip time in seconds, once measured."""
        return self._session.rtt

    def events(self) -> Iterator[Any]:
        """The session's events, ending with ``Closed``."""
        return self._thread.stream(self._session.events)

    def _farewell(self):
        return self._session.close()


class PresenceWatcher(_OnItsOwnLoop):
    """``heartbeat_client.PresenceWatcher`` for synchronous code; the same
    arguments. Iterating ``events()`` runs the watch; ``sessions``, ``epoch``
    and ``revision`` are those of the last event it yielded; ``close()`` stops
    the watch and its thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self._watcher = presence.PresenceWatcher(*args, **kwargs)

    @property
    def sessions(self):
        """The open sessions by id."""
        return self._watcher.sessions

    @property
    def epoch(self) -> int:
        """The server's epoch, once synced."""
        return self._watcher.epoch

    @property
    def revision(self) -> int:
        """The revision of the last change applied."""
        return self._watcher.revision

    def events(self) -> Iterator[Any]:
        """The watch's events, forever (``WatchFailed`` ends it)."""
        return self._thread.stream(self._watcher.events)
