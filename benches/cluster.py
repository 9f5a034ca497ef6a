#!/usr/bin/env python3
"""Measures what cluster mode costs: etcd writes per session, Welcome's
latency beside a single server, and how soon another node lists a session;
then the same for bursts, where changes share transactions.

Builds the release binary, starts a real etcd (Debian's etcd-server) and two
cluster nodes and one single server on loopback, and drives them with the
Python client's generated stubs, one session at a time. The bursts are
`heartbeat bench` opening --burst sessions on node 1 at 5,000 a second,
then dropping them all at once (killed), then opening them again and
draining node 1 (SIGTERM):

    pip install -r interop/python/requirements.txt
    python3 benches/cluster.py [--sessions 300] [--burst 10000]

Prints a Markdown table for BENCHMARKS.md. etcd writes are counted from the
revision presence reports (etcd's revision, counted from the cluster's
epoch, is the contract's revision divided by 2^20): every write to etcd is
one revision.
"""

import argparse
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = os.path.join(ROOT, "target", "release", "heartbeat")
sys.path.insert(0, os.path.join(ROOT, "interop", "python"))

import grpc  # noqa: E402

from heartbeat_client import pb  # noqa: E402
from loopback import free_port, start, start_etcd, stop  # noqa: E402

HB = pb.heartbeat


def revision(target):
    """etcd's revision as `target` last applied it, and its sessions (up to
    10,000, one page)."""
    with grpc.insecure_channel(target) as channel:
        request = pb.presence.ListSessionsRequest(page_size=10_000)
        page = pb.presence_grpc.PresenceServiceStub(channel).ListSessions(request)
    return page.revision >> 20, {session.session_id for session in page.sessions}


def until_listed(target, count, limit=120):
    """Seconds until `target` lists exactly `count` sessions."""
    started = time.perf_counter()
    while len(revision(target)[1]) != count:
        if time.perf_counter() - started > limit:
            sys.exit(f"{target} did not list {count} sessions within {limit} s")
        time.sleep(0.01)
    return time.perf_counter() - started


def burst(target, watcher, sessions):
    """`heartbeat bench` opening `sessions` on `target` at 5,000 a second:
    the process, and the seconds until `watcher` lists them all."""
    bench = subprocess.Popen(
        [HEARTBEAT, "bench", f"http://{target}", "--sessions", str(sessions), "--rate", "5000", "--duration", "1h"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return bench, until_listed(watcher, sessions)


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
    parser.add_argument("--burst", type=int, default=10_000, help="sessions per burst (default 10000, at most 10000)")
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        sys.exit("needs etcd on the PATH: apt-get install etcd-server")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    etcd, data, etcd_url = start_etcd()
    processes = [etcd]
    try:
        ports = {name: free_port() for name in ("single", "n1", "n2")}
        servers = {}
        for name, port in ports.items():
            cluster = [] if name == "single" else ["--cluster", etcd_url, "--node-id", name]
            servers[name] = start([HEARTBEAT, "serve", "--listen", f"127.0.0.1:{port}", *cluster], port)
            processes.append(servers[name])
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
        print()

        m = min(args.burst, 10_000)
        bursts = []
        before = settle(target["n2"])
        bench, opened = burst(target["n1"], target["n2"], m)
        after = settle(target["n2"])
        bursts.append((f"{m:,} opens at 5,000/s: all listed on node 2", opened, after - before))
        bench.kill()
        bench.wait()
        dropped = until_listed(target["n2"], 0)
        before, after = after, settle(target["n2"])
        bursts.append((f"{m:,} connections dropped at once: all closed on node 2", dropped, after - before))
        bench, _ = burst(target["n1"], target["n2"], m)
        before = settle(target["n2"])
        servers["n1"].terminate()
        drained = until_listed(target["n2"], 0)
        after = settle(target["n2"])
        servers["n1"].wait()
        bench.kill()
        bench.wait()
        bursts.append((f"node 1 drained with {m:,} sessions: all closed on node 2", drained, after - before))
        print("| burst | time | etcd writes | per session |")
        print("| --- | --- | --- | --- |")
        for what, seconds, writes in bursts:
            print(f"| {what} | {seconds:.2f} s | {writes:,} | {writes / m:.3f} |")
    finally:
        stop(processes, data)


if __name__ == "__main__":
    main()
