"""Holds one heartbeat session until SIGINT or SIGTERM, then says goodbye.

    python -m heartbeat_client --target 127.0.0.1:50051 --client-id w1 --label zone=eu

Prints what happens to the session (connected, rotations, round trips,
losses and reconnects) as text, or with --json one JSON object a line for scripts.
Exits 0 after a clean goodbye, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import grpc

from . import Closed, Connected, Lost, Reconnecting, Rotated, Rtt, Session


def label(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not KEY=VALUE; write it like zone=eu")
    return key, value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m heartbeat_client",
        description="Hold a heartbeat.v1 session until SIGINT or SIGTERM, then say goodbye and exit 0.",
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address, HOST:PORT (default %(default)s)")
    parser.add_argument("--client-id", default="", help="the id presence shows for this client (default: anonymous)")
    parser.add_argument(
        "--label", type=label, action="append", default=[], metavar="KEY=VALUE", help="a label for presence; repeatable"
    )
    parser.add_argument("--ca-file", type=Path, help="connect with TLS, trusting the CA certificates (PEM) in this file")
    parser.add_argument(
        "--token-file",
        type=Path,
        help="a file holding this client's bearer token (or set HEARTBEAT_TOKEN); needed when the server checks client credentials",
    )
    parser.add_argument("--no-pings", action="store_true", help="only answer the server's pings; measure no round trips")
    parser.add_argument("--json", action="store_true", help="print one JSON object a line instead of text")
    return parser


def credentials(args, fail):
    if args.ca_file is None:
        return None
    try:
        return grpc.ssl_channel_credentials(root_certificates=args.ca_file.read_bytes())
    except OSError as error:
        fail(f"--ca-file {args.ca_file}: {error.strerror}; give a readable PEM file of CA certificates")


def token(args, fail):
    if args.token_file is None:
        return os.environ.get("HEARTBEAT_TOKEN") or None
    try:
        text = args.token_file.read_text().strip()
    except OSError as error:
        fail(f"--token-file {args.token_file}: {error.strerror}; give a readable file holding the token")
    if not text:
        fail(f"--token-file {args.token_file} is empty; put the bearer token in it")
    return text


def describe(event) -> str:
    if isinstance(event, Connected):
        return f"connected: session {event.session_id} (ping every {event.ping_interval:g} s, timeout {event.timeout:g} s)"
    if isinstance(event, Rotated):
        return (
            f"rotated: session {event.from_session_id} -> {event.to_session_id}"
            f" (ping every {event.ping_interval:g} s, timeout {event.timeout:g} s)"
        )
    if isinstance(event, Rtt):
        return f"rtt {event.rtt * 1000:.2f} ms (smoothed {event.smoothed * 1000:.2f} ms)"
    if isinstance(event, Lost):
        why = event.goodbye or event.code or event.kind
        return f"lost ({event.kind}): {why} {event.message}".rstrip()
    if isinstance(event, Reconnecting):
        return f"reconnecting in {event.delay:.2f} s (attempt {event.attempt})"
    if isinstance(event, Closed):
        return "replaced by a newer session with this client id" if event.replaced else "closed"
    return repr(event)


def as_json(event) -> str:
    fields = dataclasses.asdict(event)
    return json.dumps({"event": type(event).__name__.lower(), **fields})


async def main(args, fail) -> int:
    session = Session(
        args.target,
        args.client_id,
        dict(args.label),
        credentials=credentials(args, fail),
        token=token(args, fail),
        send_pings=not args.no_pings,
    )
    loop = asyncio.get_running_loop()
    closing = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: closing.append(loop.create_task(session.close())))
    session.start()
    async for event in session.events():
        print(as_json(event) if args.json else describe(event), flush=True)
    return 0


if __name__ == "__main__":
    command_line = parser()
    sys.exit(asyncio.run(main(command_line.parse_args(), command_line.error)))
