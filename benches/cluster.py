#!/usr/bin/env python3
"""Measures what cluster mode costs: etcd writes per session, Welcome's
latency beside a single server, and how soon another node lists a session.

Builds the release binary, starts a real etcd (Debian's etcd-server) and two
cluster nodes and one single server on loopback, and drives them with the
Python client's generated stubs, one session at a time:

    pip install -r interop/python/requirements.txt
    python3 benches/cluster.py [--sessions 300]

Prints a Markdown table for BENCHMARKS.md. etcd writes are counted from the
revision presence reports (etcd's revision is the contract's revision
divided by 2^20): every write to etcd is one revision.
"""

import argparse
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = os.path.join(ROOT, "target", "release", "heartbeat")
sys.path.insert(0, os.path.join(ROOT, "interop", "python"))

import grpc  # noqa: E402

from heartbeat_client import pb  # noqa: E402
from loopback import free_port, start  # noqa: E402

HB = pb.heartbeat


def revision(target):
    with grpc.insecure_channel(target) as channel:
        page = pb.presence_grpc.PresenceServiceStub(channel).ListSessions(pb.presence.ListSessionsRequest())
    return page.revision >> 20, {session.session_id for session in page.sessions}


def session(target, client_id, listed_on=None):
    """One session: Hello, Welcome, (listed on another node), goodbye.
    Returns (Welcome latency, listed latency or None), in seconds."""
    with grpc.insecure_channel(target) as channel:
        outbox = queue.Queue()
        outbox.put(HB.HeartbeatRequest(hello=HB.Hello(client_id=client_id)))
        started = time.perf_counter()
        frames = pb.heartbeat_grpc.HeartbeatServiceStub(channel).Heartbeat(iter(outbox.get, None))
        session_id = next(frames).welcome.session_id
        welcome = time.perf_counter() - started
        listed = None
        while listed_on and listed is None:
            if session_id in revision(listed_on)[1]:
                listed = time.perf_counter() - started
        outbox.put(HB.HeartbeatRequest(goodbye=HB.Goodbye(reason=HB.GOODBYE_REASON_CLIENT_SHUTDOWN)))
        outbox.put(None)
        for _ in frames:
            pass
    return welcome, listed


def percentiles(samples):
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1e3, p99 * 1e3


def settle(target, seconds=1.0):
    """Waits until the revision stops moving (replication caught up)."""
    last = revision(target)[0]
    while True:
        time.sleep(seconds)
        now = revision(target)[0]
        if now == last:
            return now
        last = now


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300, help="sessions per measurement (default 300)")
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        sys.exit("needs etcd on the PATH: apt-get install etcd-server")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    data = tempfile.mkdtemp(prefix="hb-bench-etcd-")
    client, peer = free_port(), free_port()
    processes = [
        start(
            [
                "etcd", "--data-dir", data, "--name", "bench",
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
            ],
            client,
        )
    ]
    try:
        ports = {name: free_port() for name in ("single", "n1", "n2")}
        for name, port in ports.items():
            cluster = [] if name == "single" else ["--cluster", f"http://127.0.0.1:{client}", "--node-id", name]
            processes.append(start([HEARTBEAT, "serve", "--listen", f"127.0.0.1:{port}", *cluster], port))
        target = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        n = args.sessions
        rows = []
        for name in ("single", "n1"):
            welcome = [session(target[name], f"w-{name}-{i}")[0] for i in range(n)]
            rows.append((f"Welcome after Hello, {'single server' if name == 'single' else 'cluster node'}", *percentiles(welcome)))
        before = settle(target["n2"])
        listed = [session(target["n1"], f"v-{i}", listed_on=target["n2"])[1] for i in range(n)]
        after = settle(target["n2"])
        rows.append(("listed by another node after Hello", *percentiles(listed)))
        print(f"| measure ({n} sessions, one at a time) | p50 | p99 |")
        print("| --- | --- | --- |")
        for what, p50, p99 in rows:
            print(f"| {what} | {p50:.2f} ms | {p99:.2f} ms |")
        print()
        print(f"etcd writes per session (Hello with a client id, then goodbye): {(after - before) / n:.2f}")
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
