#!/usr/bin/env python3
"""Runs the load benchmarks and writes BENCHMARKS.md.

Builds the release binary and the plain-tonic echo baseline, then, for each
scenario, starts the server (and then the echo server) on loopback with the
settings below, drives it with `heartbeat bench`, and reads the figures from
the bench's JSON report: the server's CPU and RSS come from /proc (the bench's
--server-pid), its deadline lateness from its metrics. Every figure of the
server is printed beside the echo's from the same run, with their ratio.

    python3 benches/run.py                 # every scenario, writes BENCHMARKS.md
    python3 benches/run.py --only 10k-1s   # one scenario, prints the table only

Needs Linux (/proc), Python 3.8+, and cargo; nothing else.
"""

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = os.path.join(ROOT, "target", "release", "heartbeat")
ECHO = os.path.join(ROOT, "target", "release", "examples", "echo-server")

# name, sessions, connections, ping interval, timeout, steady duration (s).
# 100k at a 1 s interval is 200k heartbeats/s, beyond what 2 cores carry with
# the generator beside the server; it is left out.
SCENARIOS = [
    ("1k-1s", 1_000, 10, "1s", "3s", 10),
    ("10k-1s", 10_000, 100, "1s", "3s", 10),
    ("1k-10s", 1_000, 10, "10s", "30s", 30),
    ("10k-10s", 10_000, 100, "10s", "30s", 30),
    ("100k-10s", 100_000, 2_000, "10s", "30s", 30),
]

# The server's flags in every run: loopback clients come from one IP, so the
# per-IP caps are raised to let 2,000 connections and 100k streams in, and a
# client pinging every second must not earn strikes for jitter.
SERVER_FLAGS = [
    "--max-connections-per-ip", "4096",
    "--max-streams-per-ip", "200000",
    "--max-sessions", "200000",
    "--min-ping-interval", "100ms",
]

RATE = 5_000  # sessions opened per second during the ramp


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port} after {seconds}s")


def start(target, interval, timeout):
    port = free_port()
    metrics = None
    env = dict(os.environ, RUST_LOG="warn")
    if target == "server":
        metrics = free_port()
        command = [HEARTBEAT, "serve", "--listen", f"127.0.0.1:{port}",
                   "--metrics-listen", f"127.0.0.1:{metrics}",
                   "--ping-interval", interval, "--timeout", timeout] + SERVER_FLAGS
    else:
        command = [ECHO, f"127.0.0.1:{port}", "--ping-interval", interval, "--timeout", timeout]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    if metrics:
        wait_for_port(metrics, process)
    return process, port, metrics


def bench(target, sessions, connections, interval, timeout, duration, extra=()):
    process, port, metrics = start(target, interval, timeout)
    try:
        command = [HEARTBEAT, "bench", f"http://127.0.0.1:{port}",
                   "--sessions", str(sessions), "--connections", str(connections),
                   "--rate", str(RATE), "--duration", f"{duration}s",
                   "--server-pid", str(process.pid), "--output", "json", *extra]
        if metrics:
            command += ["--metrics-url", f"http://127.0.0.1:{metrics}/metrics"]
        print("  $", " ".join(command[1:]), file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"the bench failed:\n{result.stderr}")
        return json.loads(result.stdout)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def get(report, path, default=None):
    value = report
    for key in path.split("/"):
        if not isinstance(value, dict) or value.get(key) is None:
            return default
        value = value[key]
    return value


def number(value, places=1):
    return "—" if value is None else f"{value:,.{places}f}"


def ratio(ours, theirs):
    if ours is None or not theirs:
        return ""
    return f" (×{ours / theirs:.2f})"


def row(name, target, report, echo):
    cpu = get(report, "server/cpu_us_per_round_trip")
    rss = get(report, "server/rss_bytes_per_session")
    p50 = get(report, "rtt_ms/p50")
    p99 = get(report, "rtt_ms/p99")
    detection = get(report, "detection/error_ms")
    cells = [
        name, target,
        f"{get(report, 'sessions/established', 0):,}",
        number(get(report, "steady/heartbeats_per_second"), 0),
        number(cpu, 1) + (ratio(cpu, get(echo, "server/cpu_us_per_round_trip")) if echo else ""),
        number(rss, 0) + (ratio(rss, get(echo, "server/rss_bytes_per_session")) if echo else ""),
        f"{number(p50, 2)} / {number(p99, 2)}" + (ratio(p99, get(echo, "rtt_ms/p99")) if echo else ""),
        "—" if not detection else
        f"{detection['p50']:.1f} / {detection['p99']:.1f} / {detection['max']:.1f}",
        number(get(report, "server_lateness/p99_le_ms"), 0) if get(report, "server_lateness/count") else "—",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| scenario | server | sessions | heartbeats/s | server CPU µs per round trip | "
    "server RSS bytes per session | RTT p50 / p99 ms | detection error p50 / p99 / max ms | "
    "server lateness p99 ≤ ms |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as info:
            kib = int(info.readline().split()[1])
            memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} × {model}{memory}; Linux {platform.release()}; {rustc}; "
            "the generator runs on the same machine as the server")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run one scenario (by name) and print its rows")
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bin", "heartbeat", "--example", "echo-server"],
                   cwd=ROOT, check=True)
    rows = []
    for name, sessions, connections, interval, timeout, duration in SCENARIOS:
        if args.only and args.only != name:
            continue
        print(f"{name}: {sessions} sessions over {connections} connections, "
              f"ping every {interval}", file=sys.stderr)
        freeze = max(10, sessions // 100)
        echo = bench("echo", sessions, connections, interval, timeout, duration)
        ours = bench("server", sessions, connections, interval, timeout, duration,
                     ["--freeze", str(freeze)])
        rows.append(row(name, "heartbeat", ours, echo))
        rows.append(row(name, "tonic echo", echo, None))
    expiries = None
    if not args.only or args.only == "100k-expiry":
        print("100k-expiry: 100k sessions fall silent at once", file=sys.stderr)
        report = bench("server", 100_000, 2_000, "10s", "30s", 5, ["--freeze-all"])
        expiries = (get(report, "detection/closed", 0), get(report, "detection/frozen", 0),
                    get(report, "detection/last_frames_spread_ms"),
                    get(report, "detection/error_ms"),
                    get(report, "server_lateness"))
    table = HEADER + "\n" + "\n".join(rows)
    print(table)
    if expiries:
        closed, frozen, spread, errors, lateness = expiries
        expiry_line = (f"{closed:,} of {frozen:,} sessions that fell silent at once were told "
                       f"TIMEOUT (their last frames left within {number(spread, 0)} ms of each "
                       "other, as fast as the generator could send them)")
        if errors:
            expiry_line += (f"; each goodbye came after its own deadline by p50 {errors['p50']:.1f} ms, "
                            f"p99 {errors['p99']:.1f} ms, max {errors['max']:.1f} ms")
        if lateness and lateness.get("count"):
            expiry_line += (f"; the server's own lateness p99 ≤ {number(lateness.get('p99_le_ms'), 0)} ms, "
                            f"max ≤ {number(lateness.get('max_le_ms'), 0)} ms")
        print(expiry_line)
    if args.only:
        return
    with open(args.output) as current:
        text = current.read()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    today = datetime.date.today().isoformat()
    results = (f"{start}\n\nMeasured {today} on {machine()}.\n\n{table}\n\n"
               f"Simultaneous expiries: {expiry_line}.\n\n{end}")
    with open(args.output, "w") as out:
        out.write(head + results + tail)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
