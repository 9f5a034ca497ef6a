#!/usr/bin/env python3
"""Measures rotation rebalancing a fleet: a node joins, and rotation moves
sessions to it without any client going missing.

Builds the release binary and the `fleet` example, starts a real etcd
(Debian's etcd-server) and node n1 in cluster mode with a maximum session
age, and a round-robin TCP balancer (in this script) in front of the live
nodes. The fleet (`--sessions` of the library's `Client`, each on its own
connection) connects through the balancer, so all land on n1. Then n2 joins
the cluster and the balancer. Presence, watched on n1 (the cluster's view),
tells where each client is and whether it ever had no session:

    python3 -m venv venv && venv/bin/pip install -r interop/python/requirements.txt
    venv/bin/python benches/rotation.py [--sessions 8000] [--age 120s]

Prints a Markdown table for BENCHMARKS.md: how long after n2 joined the
fleet was within 10 % of even, how many client ids were ever missing from
presence, and the most rotations, and new connections at the balancer, in
one second (against the rotation limit).
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = os.path.join(ROOT, "target", "release", "heartbeat")
FLEET = os.path.join(ROOT, "target", "release", "examples", "fleet")
sys.path.insert(0, os.path.join(ROOT, "interop", "python"))

import grpc  # noqa: E402

from heartbeat_client import pb  # noqa: E402
from loopback import free_port, start, start_etcd, stop  # noqa: E402


class Balancer:
    """Round-robin TCP balancer over the backends in `self.backends`,
    counting new connections per second."""

    def __init__(self, port):
        self.port = port
        self.backends = []
        self.next = 0
        self.accepted = {}  # second -> new connections

    async def pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, reader, writer):
        second = int(time.monotonic())
        self.accepted[second] = self.accepted.get(second, 0) + 1
        backend = self.backends[self.next % len(self.backends)]
        self.next += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))

    def run(self, ready):
        async def serve():
            server = await asyncio.start_server(self.handle, "127.0.0.1", self.port, backlog=4096)
            ready.set()
            async with server:
                await server.serve_forever()

        asyncio.run(serve())


class Presence:
    """Follows WatchSessions on one node: where each client's sessions are,
    and which client ids were ever left with none."""

    def __init__(self, target):
        self.target = target
        self.sessions = {}  # session id -> (client id, node)
        self.per_client = {}  # client id -> open sessions
        self.missing = set()
        self.lock = threading.Lock()

    def run(self):
        with grpc.insecure_channel(self.target) as channel:
            stub = pb.presence_grpc.PresenceServiceStub(channel)
            for event in stub.WatchSessions(pb.presence.WatchSessionsRequest()):
                kind = event.WhichOneof("event")
                with self.lock:
                    if kind == "opened":
                        session = event.opened
                        self.sessions[session.session_id] = (session.client_id, session.node)
                        self.per_client[session.client_id] = self.per_client.get(session.client_id, 0) + 1
                    elif kind == "closed":
                        session = event.closed.session
                        if self.sessions.pop(session.session_id, None) is not None:
                            left = self.per_client[session.client_id] - 1
                            self.per_client[session.client_id] = left
                            if left == 0:
                                self.missing.add(session.client_id)

    def nodes(self):
        with self.lock:
            counts = {}
            for _, node in self.sessions.values():
                counts[node] = counts.get(node, 0) + 1
            return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8000)
    parser.add_argument("--age", default="120s", help="--max-session-age of the nodes")
    parser.add_argument("--rate", type=int, default=100, help="--max-rotations-per-second")
    args = parser.parse_args()
    age = float(args.age.rstrip("s"))
    if shutil.which("etcd") is None:
        sys.exit("needs etcd on the PATH: apt-get install etcd-server")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "fleet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    etcd, data, etcd_url = start_etcd()
    processes = [etcd]
    node = lambda name, port: start([  # noqa: E731
        HEARTBEAT, "serve", "--listen", f"127.0.0.1:{port}", "--cluster", etcd_url,
        "--node-id", name, "--max-session-age", args.age, "--max-rotations-per-second", str(args.rate),
        "--max-sessions", str(args.sessions * 2),
        # Every connection comes from the balancer's address.
        "--max-connections-per-ip", str(args.sessions * 2), "--max-streams-per-ip", str(args.sessions * 2),
    ], port)
    try:
        n1, n2, front = free_port(), free_port(), free_port()
        processes.append(node("n1", n1))
        balancer = Balancer(front)
        balancer.backends.append(n1)
        ready = threading.Event()
        threading.Thread(target=balancer.run, args=(ready,), daemon=True).start()
        ready.wait()
        presence = Presence(f"127.0.0.1:{n1}")
        threading.Thread(target=presence.run, daemon=True).start()
        fleet = subprocess.Popen([FLEET, f"http://127.0.0.1:{front}", "--sessions", str(args.sessions)],
                                 stdout=subprocess.PIPE, text=True)
        processes.append(fleet)
        last = {}
        while last.get("live", 0) < args.sessions:
            last = json.loads(fleet.stdout.readline())
        time.sleep(3)
        print(f"fleet up: {presence.nodes()}", file=sys.stderr)
        processes.append(node("n2", n2))
        balancer.backends.append(n2)
        joined = time.monotonic()
        even_after = None
        rotated_before, most_rotations = last.get("rotated", 0), 0
        while time.monotonic() - joined < 3 * age:
            time.sleep(1)
            counts = presence.nodes()
            last = json.loads(fleet.stdout.readline())
            most_rotations = max(most_rotations, last["rotated"] - rotated_before)
            rotated_before = last["rotated"]
            total = sum(counts.values())
            share = counts.get("n2", 0) / total if total else 0
            print(f"{time.monotonic() - joined:6.0f} s  {counts}  {last}", file=sys.stderr)
            if even_after is None and 0.45 <= share <= 0.55:
                even_after = time.monotonic() - joined
                settle_until = time.monotonic() + 10
            if even_after is not None and time.monotonic() > settle_until:
                break
        window = [count for second, count in balancer.accepted.items() if second >= int(joined)]
        print(f"{args.sessions} sessions, --max-session-age {args.age} (±10 %), --max-rotations-per-second {args.rate}\n")
        print("| measure | result |")
        print("| --- | --- |")
        print(f"| within 10 % of even after n2 joined | {even_after:.0f} s ({even_after / age:.2f} × max-session-age) |"
              if even_after is not None else f"| within 10 % of even after n2 joined | not within {3 * age:.0f} s |")
        print(f"| client ids ever missing from presence | {len(presence.missing)} |")
        print(f"| rotations reported by the fleet, most in one second (its once-a-second count) | {most_rotations} |")
        print(f"| new connections accepted by the balancer, most in one second | {max(window, default=0)} |")
        print(f"| rotations / losses reported by the clients | {last.get('rotated')} / {last.get('lost')} |")
    finally:
        stop(processes, data)


if __name__ == "__main__":
    main()
