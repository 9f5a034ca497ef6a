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

With --scale it measures what a large cluster costs instead, on etcd and on
the nodes, and how soon a lost node's sessions close everywhere:

    python3 benches/cluster.py --scale [--scale-sessions 100000]

Two nodes (n1, n2) with --watch-history 10000 and the default 10 s lease.
`heartbeat bench` holds --scale-sessions on n1, 1,000 streams on each HTTP/2
connection (100 connections for 100,000 sessions, well under this machine's
20,000 open files a process and the server's 4,096 streams a connection);
pings go every --scale-interval (60 s) both ways, so the sessions cost little
CPU while they stay open. Measured:

- RSS (VmRSS) of n2 before and once it lists them all: what one mirrored
  remote session costs a node; n1's own cost per session beside it.
- etcd's dbSize before and after: what one open session costs etcd.
- churn: --scale-rounds rounds of --scale-churn sessions opened on n2 at
  --scale-churn-rate (500 a second, so few opens share a transaction, as in a
  fleet's everyday churn) and dropped at once (the bench killed), each
  waited for until n1 lists them and then no longer does. The nodes compact
  etcd (--etcd-compaction on: once 2 × --watch-history revisions have
  passed, down to --watch-history), so dbSize should stop growing once the
  rounds have spent that many: each round's dbSize, dbSizeInUse, revision
  and kept history are shown, and the growth per session life is taken
  once the closed sessions' tombstones have expired.
- SIGKILL of n1 with a watcher on n2 (WatchSessions, resumed from n2's
  revision now, so no snapshot): seconds until n2 lists none of n1's
  sessions, and until the watcher has every NODE_LOST close, or how many it
  got and the status its stream ended with (a watcher whose queue overflows
  is cut off with RESOURCE_EXHAUSTED; --scale-watch-queue sets n2's queue).
"""

import argparse
import base64
import collections
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = os.path.join(ROOT, "target", "release", "heartbeat")
sys.path.insert(0, os.path.join(ROOT, "interop", "python"))

import grpc  # noqa: E402

from heartbeat_client import pb  # noqa: E402
from loopback import etcd_compacted, etcd_gateway, etcd_status, free_port, rss, start, start_etcd, stop  # noqa: E402

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


# The scale scenario (--scale).

PREFIX = "/heartbeat"  # the nodes' --cluster-prefix (the default)
WATCH_HISTORY = 10_000  # the nodes' --watch-history
STREAMS_PER_CONNECTION = 1_000  # the bench's sessions per HTTP/2 connection
MOST_SESSIONS = 1_000_000  # the most one cluster node may hold (--max-sessions)
HEADROOM = 1_000  # sessions and presence calls each node admits beyond the bench's


def log(line):
    """Progress, on stderr: a run that fails late still shows what it measured."""
    print(line, file=sys.stderr, flush=True)


def until(what, check, limit, every=0.2):
    """Seconds until `check()`, which returns (done, what it saw), is done;
    exits saying what it saw last if `limit` seconds pass first."""
    started = time.perf_counter()
    while True:
        done, seen = check()
        elapsed = time.perf_counter() - started
        if done:
            return elapsed
        if elapsed > limit:
            sys.exit(f"{what}: not within {limit:.0f} s (last seen: {seen})")
        time.sleep(every)


def listed(target):
    """The sessions `target` lists now, counted by node, over every page of
    ListSessions (10,000 a page, fewer where 4 MiB fill first). Each session
    counts as it was when its page was read: while sessions only open, a
    count of all of them is exact, and while they only close, one of none."""
    counts = collections.Counter()
    token = ""
    with grpc.insecure_channel(target) as channel:
        stub = pb.presence_grpc.PresenceServiceStub(channel)
        while True:
            request = pb.presence.ListSessionsRequest(page_size=10_000, page_token=token)
            page = stub.ListSessions(request, timeout=30)
            counts.update(session.node for session in page.sessions)
            token = page.next_page_token
            if not token:
                return counts


def answers(target):
    """A check for `until`: whether `target` answers ListSessions (a cluster
    node does once it has joined)."""
    try:
        return True, dict(listed(target))
    except grpc.RpcError as error:
        return False, error.code().name


def lists(target, node, count, *benches):
    """A check for `until`: whether `target` lists `count` sessions of
    `node`. Exits if one of `benches`, which hold their sessions until they
    are killed, has exited."""
    def check():
        for bench in benches:
            if bench.poll() is not None:
                sys.exit(f"heartbeat bench ({' '.join(bench.args[1:])}) exited with {bench.returncode}")
        counts = listed(target)
        return counts[node] == count, dict(counts)
    return check


def lists_none_of(target, node):
    """A check for `until`: whether `target` lists no session of `node`. A
    one-session page answers "not yet" cheaply while they are all listed;
    only then is every page read."""
    with grpc.insecure_channel(target) as channel:
        request = pb.presence.ListSessionsRequest(page_size=1)
        first = pb.presence_grpc.PresenceServiceStub(channel).ListSessions(request, timeout=30)
    if any(session.node == node for session in first.sessions):
        return False, f"{node}'s sessions listed"
    counts = listed(target)
    return counts[node] == 0, dict(counts)


def session_keys(url):
    """Session keys in etcd: open sessions' records and closed ones'
    tombstones, which expire with a short lease (src/cluster/keys.rs)."""
    start = f"{PREFIX}/sessions/".encode()
    end = start[:-1] + bytes([start[-1] + 1])
    encode = lambda key: base64.b64encode(key).decode()  # noqa: E731
    body = {"key": encode(start), "range_end": encode(end), "count_only": True}
    return int(etcd_gateway(url, "/v3/kv/range", body).get("count", 0))


def compactions(metrics):
    """How often a node compacted etcd, from heartbeat_cluster_compactions_total
    on its metrics port; None from a node without that metric, or gone."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    samples = [line.split()[-1] for line in text.splitlines()
               if line.startswith("heartbeat_cluster_compactions_total")]
    return int(sum(float(sample) for sample in samples)) if samples else None


def scale_node(name, port, metrics, etcd_url, args, watch_queue=None):
    """Cluster node `name` on `port`, with room for the bench's sessions:
    --max-sessions (100,000 by default) and --max-streams-per-ip (20,000 by
    default; every session comes from 127.0.0.1) raised to them plus
    headroom. The bench's connections (one per 1,000 sessions) stay under
    the default 1,024 connections per IP and 4,096 streams per connection.
    Pings every --scale-interval, timeout three of them. The nodes compact
    etcd (the default, named since the figures depend on it)."""
    room = max(args.scale_sessions, args.scale_churn) + HEADROOM
    queue_flags = [] if watch_queue is None else ["--watch-queue", str(watch_queue)]
    return start([
        HEARTBEAT, "serve", "--listen", f"127.0.0.1:{port}", "--cluster", etcd_url, "--node-id", name,
        "--metrics-listen", f"127.0.0.1:{metrics}", "--etcd-compaction", "on",
        "--watch-history", str(WATCH_HISTORY), *queue_flags,
        "--ping-interval", f"{args.scale_interval}s", "--timeout", f"{3 * args.scale_interval}s",
        "--max-sessions", str(room), "--max-streams-per-ip", str(room),
    ], port)


def hold(target, sessions, prefix, rate, interval):
    """`heartbeat bench` opening `sessions` on `target` at `rate` a second
    (client ids PREFIX-0, PREFIX-1, ...), pinging every `interval` seconds,
    and holding them for up to an hour: until it is killed, which drops
    every connection at once."""
    connections = -(-sessions // STREAMS_PER_CONNECTION)
    return start([
        HEARTBEAT, "bench", f"http://{target}", "--sessions", str(sessions), "--connections", str(connections),
        "--rate", str(rate), "--interval", f"{interval}s", "--duration", "1h", "--client-id-prefix", prefix,
    ])


class LostWatch:
    """WatchSessions on `target`, resumed from its revision now (so no
    snapshot comes, unless the node answers with a reset and one): counts
    the NODE_LOST closes, notes when the first and the `wanted`th arrived,
    and how the stream ended (a watcher whose queue overflows is cut off
    with RESOURCE_EXHAUSTED)."""

    def __init__(self, target, wanted):
        self.wanted = wanted
        self.lost = 0
        self.first = self.all = None
        self.reset = False
        self.ended = None
        self.synced = threading.Event()
        self.done = threading.Event()  # every NODE_LOST close came, or the stream ended
        self.channel = grpc.insecure_channel(target)
        stub = pb.presence_grpc.PresenceServiceStub(self.channel)
        now = stub.ListSessions(pb.presence.ListSessionsRequest(page_size=1), timeout=30)
        self.call = stub.WatchSessions(
            pb.presence.WatchSessionsRequest(resume_epoch=now.epoch, resume_after=now.revision))
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            for event in self.call:
                kind = event.WhichOneof("event")
                if kind == "synced":
                    self.synced.set()
                elif kind == "reset":
                    self.reset = True
                elif kind == "closed" and event.closed.reason == pb.presence.CLOSE_REASON_NODE_LOST:
                    self.lost += 1
                    if self.first is None:
                        self.first = time.perf_counter()
                    if self.lost == self.wanted:
                        self.all = time.perf_counter()
                        self.done.set()
            self.ended = "OK (the server ended the stream)"
        except grpc.RpcError as error:
            self.ended = f"{error.code().name}: {error.details()}"
        finally:
            self.done.set()

    def close(self):
        self.call.cancel()
        self.thread.join(10)
        self.channel.close()


def etcd_now(url, metrics):
    """etcd's status, with the revision its history was compacted to and the
    nodes' compaction counts (by metrics port) added."""
    status = etcd_status(url)
    status["compacted"] = etcd_compacted(url, status["revision"])
    status["compactions"] = [compactions(port) for port in metrics]
    return status


def mib(size):
    return f"{size / 2**20:,.1f} MiB"


def check_scale(args):
    """Exits naming the --scale-* flag that cannot work."""
    most = MOST_SESSIONS - HEADROOM
    for flag, value in (("--scale-sessions", args.scale_sessions), ("--scale-churn", args.scale_churn)):
        if not 1 <= value <= most:
            sys.exit(f"{flag} {value} must be from 1 to {most:,} (a cluster node holds at most {MOST_SESSIONS:,})")
    if args.scale_rounds < 1:
        sys.exit(f"--scale-rounds {args.scale_rounds} must be at least 1")
    if not (args.scale_rate > 0 and args.scale_churn_rate > 0):
        sys.exit("--scale-rate and --scale-churn-rate must be above 0 sessions a second")
    if not 2 <= args.scale_interval <= 8 * 3600:
        sys.exit(f"--scale-interval {args.scale_interval} must be from 2 seconds (over the nodes' "
                 "--min-ping-interval of 1 s) to 8 hours (a timeout of three is at most a day)")
    if args.scale_watch_queue is not None and args.scale_watch_queue < 1:
        sys.exit(f"--scale-watch-queue {args.scale_watch_queue} must be at least 1")


def scale(args):
    """The --scale scenario (see the module's docstring)."""
    n, churn, rounds = args.scale_sessions, args.scale_churn, args.scale_rounds
    # A SIGTERM to this script stops what it started too (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    etcd_process, data, etcd_url = start_etcd()
    processes = [etcd_process]
    watch = None
    try:
        ports = {name: (free_port(), free_port()) for name in ("n1", "n2")}
        nodes = {}
        for name, (port, metrics) in ports.items():
            queue_size = args.scale_watch_queue if name == "n2" else None
            nodes[name] = scale_node(name, port, metrics, etcd_url, args, queue_size)
            processes.append(nodes[name])
        target = {name: f"127.0.0.1:{port}" for name, (port, _) in ports.items()}
        metrics_ports = [metrics for _, metrics in ports.values()]
        for name in nodes:
            until(f"{name} answering ListSessions", lambda name=name: answers(target[name]), 60)
        time.sleep(1)  # joined: the baseline is taken at rest

        # Open sessions: RSS on both nodes, dbSize.
        rss_before = {name: rss(process) for name, process in nodes.items()}
        empty = etcd_status(etcd_url)
        log(f"before: RSS n1 {mib(rss_before['n1'])}, n2 {mib(rss_before['n2'])}; etcd dbSize {mib(empty['db_size'])}")
        bench = hold(target["n1"], n, "scale", args.scale_rate, args.scale_interval)
        processes.append(bench)
        mirrored = until(f"node 2 listing all {n:,} sessions of node 1", lists(target["n2"], "n1", n, bench),
                         n / args.scale_rate + 120, every=1)
        rss_after = {name: rss(process) for name, process in nodes.items()}
        opened = etcd_now(etcd_url, metrics_ports)
        per_rss = {name: (rss_after[name] - rss_before[name]) / n for name in nodes}
        per_open = (opened["db_size"] - empty["db_size"]) / n
        log(f"{n:,} listed on n2 after {mirrored:.1f} s; RSS per session n2 {per_rss['n2']:,.0f} B, "
            f"n1 {per_rss['n1']:,.0f} B; etcd dbSize per open session {per_open:,.0f} B")

        # Churn on node 2, watched from node 1.
        history = [("the sessions opened", opened, None, None)]
        for round_ in range(1, rounds + 1):
            bench = hold(target["n2"], churn, f"churn{round_}", args.scale_churn_rate, args.scale_interval)
            processes.append(bench)
            until(f"round {round_}: node 1 listing {churn:,} sessions of node 2",
                  lists(target["n1"], "n2", churn, bench), churn / args.scale_churn_rate + 120, every=1)
            bench.kill()
            bench.wait()
            until(f"round {round_}: node 1 listing none of node 2's sessions once their bench was killed",
                  lists(target["n1"], "n2", 0), 120, every=1)
            now = etcd_now(etcd_url, metrics_ports)
            growth = (now["db_size"] - history[-1][1]["db_size"]) / churn
            since = (now["db_size"] - opened["db_size"]) / (round_ * churn)
            history.append((f"churn round {round_}", now, growth, since))
            log(f"round {round_}: etcd revision {now['revision']:,}, compacted to {now['compacted']:,}, "
                f"dbSize {mib(now['db_size'])}, growth per session life {growth:,.0f} B this round")

        def tombstones():
            keys, open_ = session_keys(etcd_url), sum(listed(target["n1"]).values())
            return keys == open_, f"{keys:,} session keys in etcd, {open_:,} sessions open"
        expired = until("the churned sessions' tombstones expiring in etcd", tombstones, 120, every=1)
        settled = etcd_now(etcd_url, metrics_ports)
        per_life = (settled["db_size"] - opened["db_size"]) / (rounds * churn)
        history.append((f"tombstones expired ({expired:.0f} s later)", settled, None, per_life))

        # Node 1 lost: how soon node 2, and a watcher on it, see its sessions closed.
        watch = LostWatch(target["n2"], n)
        until("the watch on node 2 synced", lambda: (watch.synced.is_set() or watch.done.is_set(), watch.ended), 120)
        if not watch.synced.is_set():
            sys.exit(f"the watch on node 2 ended before it synced: {watch.ended}")
        killed = time.perf_counter()
        nodes["n1"].kill()
        nodes["n1"].wait()
        until("node 2 listing none of node 1's sessions after its SIGKILL",
              lambda: lists_none_of(target["n2"], "n1"), 120, every=0.05)
        gone = time.perf_counter() - killed
        watch.done.wait(max(0.0, killed + 120 - time.perf_counter()))
        first = "none" if watch.first is None else f"the first after {watch.first - killed:.2f} s"
        if watch.all is not None:
            watched = f"all {n:,} after {watch.all - killed:.2f} s ({first})"
        else:
            ending = watch.ended or f"still open {time.perf_counter() - killed:.0f} s after the kill"
            watched = f"{watch.lost:,} of {n:,} ({first}), then {ending}"
        if watch.reset:
            watched += "; the resume was answered with a reset and a snapshot"
        log(f"node 1 killed: node 2 listed none of its sessions after {gone:.2f} s; watcher: {watched}")

        connections = -(-n // STREAMS_PER_CONNECTION)
        print(f"{n:,} sessions held on node 1 by `heartbeat bench` ({connections:,} HTTP/2 connection"
              f"{'s' if connections > 1 else ''}, opened at "
              f"{args.scale_rate:,.0f}/s, pings every {args.scale_interval} s both ways); {rounds} rounds of "
              f"{churn:,} sessions opened on node 2 at {args.scale_churn_rate:,.0f}/s and dropped at once; "
              f"--etcd-compaction on, --watch-history {WATCH_HISTORY:,}, lease TTL 10 s; etcd {empty['version']}\n")
        print("| measure | result |")
        print("| --- | --- |")
        print(f"| node 2's RSS per mirrored remote session | {per_rss['n2']:,.0f} B "
              f"({mib(rss_before['n2'])} → {mib(rss_after['n2'])}) |")
        print(f"| node 1's RSS per session it holds (and mirrors) | {per_rss['n1']:,.0f} B "
              f"({mib(rss_before['n1'])} → {mib(rss_after['n1'])}) |")
        print(f"| all {n:,} listed on node 2, from the bench's start | {mirrored:.1f} s "
              f"(the ramp alone takes {n / args.scale_rate:.1f} s) |")
        print(f"| etcd dbSize per open session | {per_open:,.0f} B ({mib(empty['db_size'])} → "
              f"{mib(opened['db_size'])}, {opened['revision'] - empty['revision']:,} revisions) |")
        print(f"| etcd dbSize growth per session life ({rounds} × {churn:,}, tombstones expired) | {per_life:,.0f} B |")
        print(f"| node 1 SIGKILLed: node 2 lists none of its sessions | {gone:.2f} s |")
        print(f"| node 1 SIGKILLed: NODE_LOST closes reaching a watcher on node 2 | {watched} |")
        print()
        print("| etcd after | revision | history kept | dbSize | dbSizeInUse | dbSize growth per session life, "
              "this round | the same, since the sessions opened | compactions (n1, n2) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for what, status, growth, since in history:
            kept = (f"{status['revision'] - status['compacted']:,} revisions" if status["compacted"]
                    else "all (never compacted)")
            in_use = "?" if status["db_size_in_use"] is None else mib(status["db_size_in_use"])
            counts = ", ".join("?" if count is None else str(count) for count in status["compactions"])
            growth, since = ("" if value is None else f"{value:,.0f} B" for value in (growth, since))
            print(f"| {what} | {status['revision']:,} | {kept} | {mib(status['db_size'])} | {in_use} | {growth} "
                  f"| {since} | {counts} |")
        if not settled["compacted"]:
            print(f"\netcd's history was never compacted during the run ({settled['revision']:,} revisions; the "
                  f"nodes compact once {2 * WATCH_HISTORY:,} have passed): the growth above is without compaction. "
                  "More --scale-rounds, or a lower --scale-churn-rate, spend more revisions.")
        command = (f"python3 benches/cluster.py --scale --scale-sessions {n} --scale-rate {args.scale_rate:g} "
                   f"--scale-interval {args.scale_interval} --scale-churn {churn} --scale-rounds {rounds} "
                   f"--scale-churn-rate {args.scale_churn_rate:g}")
        if args.scale_watch_queue is not None:
            command += f" --scale-watch-queue {args.scale_watch_queue}"
        print(f"\nReproduce: `{command}`")
    finally:
        if watch is not None:
            watch.close()
        stop(processes, data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300, help="sessions per measurement (default 300)")
    parser.add_argument("--burst", type=int, default=10_000, help="sessions per burst (default 10000, at most 10000)")
    parser.add_argument("--scale", action="store_true",
                        help="measure the scale scenario instead (see the docstring; the --scale-* flags)")
    parser.add_argument("--scale-sessions", type=int, default=100_000,
                        help="sessions held on node 1 (default 100000)")
    parser.add_argument("--scale-rate", type=float, default=5000, help="their opens a second (default 5000)")
    parser.add_argument("--scale-interval", type=int, default=60,
                        help="seconds between pings, both ways: the nodes' --ping-interval (timeout 3 x) "
                             "and the bench's --interval (default 60)")
    parser.add_argument("--scale-churn", type=int, default=10_000, help="sessions per churn round (default 10000)")
    parser.add_argument("--scale-rounds", type=int, default=4, help="churn rounds (default 4)")
    parser.add_argument("--scale-churn-rate", type=float, default=500,
                        help="churned sessions' opens a second (default 500)")
    parser.add_argument("--scale-watch-queue", type=int,
                        help="node 2's --watch-queue, the watcher's queue (default: the server's, 1024)")
    args = parser.parse_args()
    if args.scale:
        check_scale(args)
    if shutil.which("etcd") is None:
        sys.exit("needs etcd on the PATH: apt-get install etcd-server")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    if args.scale:
        return scale(args)
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
