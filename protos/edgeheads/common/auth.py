"""The cluster token on gRPC: clients attach it to every call, servers refuse calls without it.

One mechanism for TLS and plaintext alike: client interceptors add ``authorization: Bearer
TOKEN`` to each call's metadata (gRPC's call credentials would need TLS), and a server
interceptor compares it in constant time (``hmac.compare_digest``). A refused call ends with
UNAUTHENTICATED and is logged with the caller's address, at most once per reason and caller
host every ``RefusalLog.interval_seconds`` (the next line counts the ones left out). No method
is exempt, grpc.health.v1 included: ``edgeheads health`` reads the same settings as the
daemons, and with mutual TLS a probe without a cluster certificate cannot connect anyway.
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["RefusalLog", "TokenCheck", "aio_token_interceptors", "peer_host", "token_matches",
           "with_token"]

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "Bearer "


def token_matches(presented: str | bytes | None, expected: str) -> bool:
    """Whether ``presented`` is ``expected``, in time that does not depend on where they differ."""
    if presented is None:
        return False
    if isinstance(presented, str):
        presented = presented.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(presented, expected.encode("utf-8"))


def peer_host(peer: Any) -> str:
    """The host part of a gRPC peer (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``) or a socket's peername."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    text = str(peer or "?")
    for prefix in ("ipv4:", "ipv6:"):
        text = text.removeprefix(prefix)
    host, sep, _ = text.rpartition(":")
    return (host if sep else text).strip("[]")


class RefusalLog:
    """Logs refused connections and calls as warnings, rate-limited per (reason, caller host):
    the first is logged at once, later ones within ``interval_seconds`` only counted."""

    MAX_KEYS = 4096

    def __init__(self, logger: logging.Logger, interval_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last logged at, left out since)

    def refused(self, reason: str, peer: Any, detail: str = "") -> bool:
        """Record one refusal; True when it was logged."""
        key = (reason, peer_host(peer))
        now = self.clock()
        last, left_out = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval_seconds:
            self._seen[key] = (last, left_out + 1)
            return False
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        more = f" ({left_out} more from this host since the last report)" if left_out else ""
        self.logger.warning("refused %s from %s: %s%s", detail or "a connection", _peer_text(peer), reason, more)
        return True


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


# ---------------------------------------------------------------- server side

def _presented_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return text[len(SCHEME):] if text.startswith(SCHEME) else ""
    return None


class TokenCheck(grpc.aio.ServerInterceptor):
    """A grpc.aio server interceptor: every call must carry the cluster token."""

    def __init__(self, token: str, refusals: RefusalLog | None = None) -> None:
        self._token = token
        self.refusals = refusals or RefusalLog(log)

    async def intercept_service(self, continuation, handler_call_details):
        presented = _presented_token(handler_call_details.invocation_metadata)
        if token_matches(presented, self._token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: UNIMPLEMENTED, as without a token
            return None
        reason = "no cluster token" if presented is None else "a wrong cluster token"
        return _refusing(handler, handler_call_details.method, reason, self.refusals)


def _refusing(handler: grpc.RpcMethodHandler, method: str, reason: str,
              refusals: RefusalLog) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that logs and aborts with UNAUTHENTICATED. Requests are
    left as bytes: nothing a caller without the token sent is parsed."""
    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        refusals.refused(reason, context.peer(), f"an RPC to {method}")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{reason}: every call to this cluster needs its token (security.token or "
                            "security.token_file)")

    kind = (handler.request_streaming, handler.response_streaming)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[kind](refuse, response_serializer=handler.response_serializer)


# ---------------------------------------------------------------- client side

def with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    """``metadata`` (None, pairs, or grpc.aio.Metadata) with the token's entry added."""
    return [*(tuple(item) for item in (metadata or ())), (METADATA_KEY, SCHEME + token)]


class _AioTokenBase:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*with_token(details.metadata, self._token)))

    async def _call(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryUnary(_AioTokenBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _AioUnaryStream(_AioTokenBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _AioStreamUnary(_AioTokenBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


class _AioStreamStream(_AioTokenBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


def aio_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call kind (a grpc.aio channel files each under one kind only)."""
    return [cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The same for a synchronous channel (grpc.intercept_channel)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> _SyncDetails:
        return _SyncDetails(details.method, details.timeout, with_token(details.metadata, self._token),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
