#!/usr/bin/env python3
"""Measures adaptive suspicion against fixed: false suspicions of steady and
jittery clients, and how soon frozen ones are suspected.

Builds the release binary, then for each mode (`--suspicion fixed`, then
`--suspicion adaptive`) starts a server on loopback and runs
`heartbeat bench --jitter` against it: half the sessions steady (a frame every
interval ± 1 ms), half jittery (log-normal gaps around the interval, and
stalls of three intervals), then `--freeze` of each population stop:

    python3 benches/suspicion.py [--sessions 400] [--duration 300s]

Prints a Markdown table for BENCHMARKS.md.
"""

import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = os.path.join(ROOT, "target", "release", "heartbeat")

from loopback import free_port, start  # noqa: E402


def run(mode, args):
    port = free_port()
    server = start(
        [HEARTBEAT, "serve", "--listen", f"127.0.0.1:{port}", "--ping-interval", args.interval,
         "--timeout", args.timeout, "--min-ping-interval", "100ms", "--suspicion", mode],
        port)
    try:
        bench = subprocess.run(
            [HEARTBEAT, "bench", f"http://127.0.0.1:{port}", "--jitter", args.jitter,
             "--sessions", str(args.sessions), "--duration", args.duration,
             "--freeze", str(args.freeze), "--output", "json"],
            check=True, capture_output=True, text=True)
        return json.loads(bench.stdout)
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=400, help="sessions in all, half per population")
    parser.add_argument("--duration", default="300s", help="the steady phase")
    parser.add_argument("--freeze", type=int, default=50, help="sessions of each population frozen at the end")
    parser.add_argument("--jitter", default="0.25:0.02", help="the jittery population: SIGMA[:STALLS]")
    parser.add_argument("--interval", default="1s")
    parser.add_argument("--timeout", default="4s")
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    reports = {mode: run(mode, args) for mode in ("fixed", "adaptive")}
    print(f"interval {args.interval}, timeout {args.timeout} (suspect_after 2 s by default), "
          f"{args.sessions} sessions for {args.duration}, jitter {args.jitter}, {args.freeze} frozen per population\n")
    print("| mode | population | session-minutes | false suspicions / 1,000 session-min | frozen: suspected after (mean / p50 / p99 ms) |")
    print("| --- | --- | --- | --- | --- |")
    for mode, report in reports.items():
        for name in ("steady", "jittery"):
            p = report["populations"][name]
            after = p["suspected_after_freeze_ms"]
            print(f"| {mode} | {name} | {p['session_minutes']} | {p['false_suspicions_per_1000_session_minutes']} "
                  f"| {after['mean']} / {after['p50']} / {after['p99']} |")


if __name__ == "__main__":
    main()
