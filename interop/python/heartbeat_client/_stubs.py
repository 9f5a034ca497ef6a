"""Stubs generated from the project's ``.proto`` files, on first use.

The package ships no generated code. The first import generates it from the
contract beside it (``proto/`` at the top of the repository, or the directory
named by ``HEARTBEAT_PROTO_DIR``) with grpcio-tools' own protoc, so the stubs
can never lag behind the ``.proto`` files and no system protoc is needed.

Generated files go to ``_generated/<hash of the .proto files>/``: a changed
contract gets a new directory, and a process that generates while another one
does publishes its directory with one atomic rename, so no process ever
imports half-written stubs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

FILES = ("heartbeat/v1/heartbeat.proto", "heartbeat/v1/presence.proto")


def proto_dir() -> Path:
    """Where the ``.proto`` files are."""
    configured = os.environ.get("HEARTBEAT_PROTO_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "proto"


def stubs_dir() -> Path:
    """The directory holding stubs for the current ``.proto`` files, generated
    if they are missing. It is what goes on ``sys.path``: the generated modules
    import each other as ``heartbeat.v1.*``."""
    source = proto_dir()
    digest = hashlib.sha256()
    for name in FILES:
        path = source / name
        if not path.is_file():
            raise ImportError(
                f"heartbeat_client: {path} not found; run from a checkout of the "
                "project, or set HEARTBEAT_PROTO_DIR to the directory that holds "
                "heartbeat/v1/*.proto"
            )
        digest.update(name.encode())
        digest.update(path.read_bytes())
    target = Path(__file__).parent / "_generated" / digest.hexdigest()[:16]
    if not (target / "heartbeat" / "v1" / "presence_pb2_grpc.py").is_file():
        _generate(source, target)
    return target


def _generate(source: Path, target: Path) -> None:
    from grpc_tools import protoc

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        well_known = resources.files("grpc_tools") / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{source}",
                f"-I{well_known}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                *(str(source / name) for name in FILES),
            ]
        )
        if status != 0:
            raise ImportError(
                f"heartbeat_client: protoc failed ({status}) on {source}; "
                "is grpcio-tools installed (pip install -r requirements.txt)?"
            )
        try:
            scratch.rename(target)
        except OSError:
            # Another process published the same stubs first; theirs are equal.
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load():
    """Imports the generated modules: ``(heartbeat_pb2, heartbeat_pb2_grpc,
    presence_pb2, presence_pb2_grpc)``."""
    path = str(stubs_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    return tuple(
        importlib.import_module(f"heartbeat.v1.{name}")
        for name in ("heartbeat_pb2", "heartbeat_pb2_grpc", "presence_pb2", "presence_pb2_grpc")
    )
