"""Drives the server from Python for the project's interop tests.

Each subcommand prints one JSON object a line, flushed, so the test that runs
it reads what happened as it happens; ``t`` is seconds since the start.

    raw    a session on the generated stubs alone, with chosen behaviour:
           --answer (pong every server ping), --ping SEQ (send these pings
           after Welcome), --flood (ping without pause), --goodbye-after S.
           Prints each frame received, then the final status.
    watch  the package's presence watcher, driven synchronously; prints each
           event, and with --views the watcher's view after it.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import grpc

from heartbeat_client import (
    Interrupted,
    Opened,
    Recovered,
    Reset,
    SessionClosed,
    Suspected,
    Synced,
    pb,
    sync,
)
from heartbeat_client._channel import bearer, seconds

_start = time.monotonic()
_hb = pb.heartbeat


_out_lock = threading.Lock()


def out(**fields) -> None:
    # One write per line under a lock: `raw` prints from the goodbye timer's
    # thread too, and print() writes the text and its newline separately, so
    # two threads could glue two objects onto one line.
    line = json.dumps({**fields, "t": round(time.monotonic() - _start, 6)}) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def read_secret(path):
    return Path(path).read_text().strip() if path else None


def channel_credentials(ca_file):
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes()) if ca_file else None


def raw(args) -> None:
    # The synchronous API: grpcio's asyncio API can report INTERNAL instead of
    # the server's status when a write races the end of the call
    # (grpc/grpc#36066), which a flood always does.
    outbox: queue.Queue = queue.Queue()
    goodbye_seen = threading.Event()
    flood = object()

    def requests():
        out(sent="hello")  # just before: the server gets it no earlier
        yield _hb.HeartbeatRequest(hello=_hb.Hello(client_id=args.client_id))
        while (request := outbox.get()) is not None:
            if request is flood:
                seq = 0
                while not goodbye_seen.is_set():
                    seq += 1
                    yield _hb.HeartbeatRequest(ping=_hb.Ping(seq=seq))
            else:
                yield request

    def say_goodbye() -> None:
        goodbye = _hb.Goodbye(reason=_hb.GOODBYE_REASON_CLIENT_SHUTDOWN)
        outbox.put(_hb.HeartbeatRequest(goodbye=goodbye))
        outbox.put(None)
        out(sent="goodbye")

    credentials = channel_credentials(args.ca_file)
    channel = grpc.secure_channel(args.target, credentials) if credentials else grpc.insecure_channel(args.target)
    stub = pb.heartbeat_grpc.HeartbeatServiceStub(channel)
    responses = stub.Heartbeat(requests(), metadata=bearer(read_secret(args.token_file)))
    timer = threading.Timer(args.goodbye_after or 0, say_goodbye)
    try:
        for response in responses:
            kind = response.WhichOneof("frame")
            if kind == "welcome":
                welcome = response.welcome
                out(
                    frame="welcome",
                    session_id=welcome.session_id,
                    ping_interval=seconds(welcome.ping_interval),
                    timeout=seconds(welcome.timeout),
                )
                for seq in args.ping:
                    outbox.put(_hb.HeartbeatRequest(ping=_hb.Ping(seq=seq)))
                if args.flood:
                    outbox.put(flood)
                if args.goodbye_after is not None:
                    timer.start()
            elif kind == "ping":
                out(frame="ping", seq=response.ping.seq)
                if args.answer:
                    outbox.put(_hb.HeartbeatRequest(pong=_hb.Pong(seq=response.ping.seq)))
            elif kind == "pong":
                out(frame="pong", seq=response.pong.seq)
            elif kind == "goodbye":
                goodbye_seen.set()
                goodbye = response.goodbye
                out(frame="goodbye", reason=_hb.GoodbyeReason.Name(goodbye.reason), message=goodbye.message)
        out(end=responses.code().name, details=responses.details() or "")
    except grpc.RpcError as error:
        out(end=error.code().name, details=error.details() or "")
    finally:
        timer.cancel()
        outbox.put(None)
        channel.close()


def watch(args) -> None:
    watcher = sync.PresenceWatcher(
        args.target,
        credentials=channel_credentials(args.ca_file),
        admin_token=read_secret(args.token_file),
    )
    for event in watcher.events():
        if isinstance(event, (Opened, Suspected, Recovered)):
            name = {Opened: "opened", Suspected: "suspected", Recovered: "recovered"}[type(event)]
            out(event=name, session_id=event.session.session_id, client_id=event.session.client_id, revision=event.revision)
        elif isinstance(event, SessionClosed):
            out(
                event="closed",
                session_id=event.session.session_id,
                client_id=event.session.client_id,
                reason=event.reason,
                revision=event.revision,
            )
        elif isinstance(event, Synced):
            out(event="synced", epoch=event.epoch, revision=event.revision)
        elif isinstance(event, Reset):
            out(event="reset", revision=event.revision)
        elif isinstance(event, Interrupted):
            out(event="interrupted", code=event.code, retry_in=event.retry_in)
        if args.views:
            out(event="view", epoch=watcher.epoch, revision=watcher.revision, sessions=sorted(watcher.sessions))


def main(argv) -> None:
    parser = argparse.ArgumentParser(prog="conformance.py")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("raw", "watch"):
        command = commands.add_parser(name)
        command.add_argument("--target", required=True)
        command.add_argument("--ca-file")
        command.add_argument("--token-file")
    commands.choices["watch"].add_argument("--views", action="store_true")
    raw_command = commands.choices["raw"]
    raw_command.add_argument("--client-id", default="")
    raw_command.add_argument("--answer", action="store_true")
    raw_command.add_argument("--ping", type=int, action="append", default=[])
    raw_command.add_argument("--flood", action="store_true")
    raw_command.add_argument("--goodbye-after", type=float)
    args = parser.parse_args(argv)
    if args.command == "raw":
        raw(args)
    else:
        watch(args)


if __name__ == "__main__":
    main(sys.argv[1:])
