"""Channels and call metadata, one way for sessions and watchers alike."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import grpc


def open_channel(
    target: str,
    credentials: Optional[grpc.ChannelCredentials],
    options: Sequence[Tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target``: TLS when ``credentials`` are given
    (``grpc.ssl_channel_credentials(root_certificates=...)``), plaintext otherwise.
    ``options`` are gRPC channel arguments."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def bearer(token: Optional[str]) -> Sequence[Tuple[str, str]]:
    """The metadata that presents ``token``: ``authorization: Bearer <token>``."""
    if not token:
        return ()
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in token):
        raise ValueError("the token holds white space or control characters; pass the token alone")
    return (("authorization", f"Bearer {token}"),)


def seconds(duration) -> float:
    """A ``google.protobuf.Duration`` in seconds."""
    return duration.seconds + duration.nanos / 1e9
