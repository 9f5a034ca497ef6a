"""What the bench scripts share: ports on loopback, processes that listen on
them (and their memory), and a real etcd (and what its status says). (`run.py`
keeps its own wait, which also watches the process it started.)"""

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, seconds=30):
    """Waits until something accepts on `port`, or exits saying nothing did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listened on port {port} within {seconds} s")


def start(args, port=None, **kwargs):
    """Starts `args` with its output discarded, and waits for it to listen on
    `port` when one is given (killing it if it does not, before exiting)."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    if port:
        try:
            wait_for_port(port)
        except SystemExit:
            process.kill()
            process.wait()
            raise
    return process


def start_etcd():
    """A real etcd (Debian's etcd-server) on loopback with a fresh data
    directory: its process, the directory, and its client URL."""
    data = tempfile.mkdtemp(prefix="hb-bench-etcd-")
    client, peer = free_port(), free_port()
    process = start(
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
    return process, data, f"http://127.0.0.1:{client}"


def rss(process):
    """The resident memory of `process` now, in bytes (VmRSS in /proc)."""
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {process.pid}: has it exited?")


def etcd_gateway(url, path, body):
    """One call to etcd's JSON gateway (`POST URL/v3/...`): the answer, decoded.
    The gateway writes 64-bit integers as strings and leaves out fields that
    are zero."""
    request = urllib.request.Request(
        f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def etcd_status(url):
    """etcd's status: `revision`, `db_size` (the file's size) and
    `db_size_in_use` (the pages holding data, which compaction frees for
    reuse; None where etcd does not say) as integers, whether the gateway
    wrote them as strings or numbers, and etcd's `version`."""
    status = etcd_gateway(url, "/v3/maintenance/status", {})
    in_use = status.get("dbSizeInUse")
    return {
        "revision": int(status["header"]["revision"]),
        "db_size": int(status["dbSize"]),
        "db_size_in_use": None if in_use is None else int(in_use),
        "version": status.get("version", "?"),
    }


def etcd_compacted(url, revision):
    """The revision etcd's history was last compacted to (0 if never), found
    by reading at revisions up to `revision` (etcd's current one): etcd
    refuses to read below it. About 20 small reads."""
    def readable(at):
        try:
            body = {"key": base64.b64encode(b"\0").decode(), "revision": str(at), "limit": "1", "keys_only": True}
            etcd_gateway(url, "/v3/kv/range", body)
            return True
        except urllib.error.HTTPError as error:
            if "compacted" in error.read().decode(errors="replace"):
                return False
            raise
    if readable(1):
        return 0
    low, high = 1, revision  # unreadable, readable
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if readable(middle) else (middle, high)
    return high


def stop(processes, data, grace=30):
    """Stops `processes`, the last started first (SIGTERM, then SIGKILL for
    one still running after `grace` seconds), and removes `data`."""
    for process in reversed(processes):
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"{process.args[0]} (pid {process.pid}) did not stop within {grace} s of SIGTERM; killed",
                  file=sys.stderr)
            process.kill()
            process.wait()
    shutil.rmtree(data, ignore_errors=True)
