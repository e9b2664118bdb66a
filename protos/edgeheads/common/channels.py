"""The one place gRPC channels are opened: with mutual TLS when the node has it, plaintext
otherwise, and the cluster token on every call when there is one (edgeheads.common.auth).

``security`` None means the process's own (edgeheads.common.security.current_security: what its
daemon installed at start; plaintext without a token in a process that installed nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from edgeheads.common.auth import SyncTokenInterceptor, aio_token_interceptors
from edgeheads.common.config import GrpcSettings
from edgeheads.common.security import Security, current_security

__all__ = ["aio_channel", "open_channel", "open_sync_channel"]


def open_channel(address: str, grpc_settings: GrpcSettings | None = None,
                 security: Security | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` with ``grpc_settings``' limits and keepalive."""
    return aio_channel(address, (grpc_settings or GrpcSettings()).channel_options(), security)


def aio_channel(address: str, options: Sequence[tuple[str, int]], security: Security | None = None
                ) -> grpc.aio.Channel:
    """:func:`open_channel` with the channel options given as they are."""
    security = current_security() if security is None else security
    options = [*options, *security.channel_options()]
    interceptors = aio_token_interceptors(security.token) if security.token else None
    if security.tls is not None:
        return grpc.aio.secure_channel(address, security.channel_credentials, options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


def open_sync_channel(address: str, grpc_settings: GrpcSettings | None = None,
                      security: Security | None = None) -> grpc.Channel:
    """A synchronous channel (the CLI, the Python Client), otherwise as :func:`open_channel`."""
    security = current_security() if security is None else security
    options = [*(grpc_settings or GrpcSettings()).channel_options(), *security.channel_options()]
    if security.tls is not None:
        channel = grpc.secure_channel(address, security.channel_credentials, options)
    else:
        channel = grpc.insecure_channel(address, options)
    return grpc.intercept_channel(channel, SyncTokenInterceptor(security.token)) if security.token else channel
