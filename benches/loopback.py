"""What the bench scripts share: ports on loopback, processes that listen on
them, and a real etcd. (`run.py` keeps its own wait, which also watches the
process it started.)"""

import shutil
import socket
import subprocess
import sys
import tempfile
import time


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
    `port` when one is given."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    if port:
        wait_for_port(port)
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


def stop(processes, data):
    """Stops `processes`, the last started first, and removes `data`."""
    for process in reversed(processes):
        process.terminate()
        process.wait()
    shutil.rmtree(data, ignore_errors=True)
