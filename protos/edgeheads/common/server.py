"""What every edgeheads daemon's gRPC server has: explicit message limits and keepalive
(GrpcSettings), mutual TLS and the cluster token when configured (edgeheads.common.security;
this is the one place a port is bound), grpc.health.v1, server reflection, a ready file,
systemd's notify protocol (readiness, watchdog, stopping; edgeheads.common.sdnotify) and a
graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from edgeheads.common import metrics
from edgeheads.common.auth import TokenCheck
from edgeheads.common.config import GrpcSettings
from edgeheads.common.security import Security, current_security, exposure_warning
from edgeheads.common.sdnotify import Notifier

log = logging.getLogger(__name__)

def write_ready_file(path: str, address: str) -> None:
    """Atomically write the bound address: launchers wait for this file to appear."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(address)
    os.replace(tmp, path)


def serve_metrics(listen: str | None, registry, ready_file: str | None) -> str | None:
    """Start the daemon's Prometheus exporter; with a ready file, write the bound address to
    ``READY.metrics`` first (launchers read it once the ready file appears)."""
    bound = metrics.serve(listen, registry)
    if bound and ready_file:
        write_ready_file(f"{ready_file}.metrics", bound)
    return bound


def bind(server: grpc.aio.Server, listen: str, security: Security) -> int:
    """Bind ``server`` to ``listen``: with mutual TLS when ``security`` has it (plaintext
    connections are then refused), else plaintext. The port bound; OSError if none."""
    if security.tls is not None:
        port = server.add_secure_port(listen, security.server_credentials)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return port


class _Undecodable:
    """What a handler is given instead of a request its deserializer refused."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _UndecodableRequest(Exception):
    """Raised by a request stream at a message that does not decode; DecodeCheck's wrapper turns it
    into INVALID_ARGUMENT."""


def _details(request: _Undecodable) -> str:
    return f"the request does not decode: {request.error}"


class DecodeCheck(grpc.aio.ServerInterceptor):
    """A request that does not decode (bytes that are not a message of the method's type) ends
    with INVALID_ARGUMENT: grpc.aio answers it with UNKNOWN and a traceback in the log, as if the
    servicer had failed. Plain generators and plain functions of request streams are left as they are
    (the daemons have none)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = (handler.request_streaming, handler.response_streaming)
        behavior = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                    (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]
        if inspect.isasyncgenfunction(behavior):
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for reply in behavior(await _checked(request, context, handler.request_streaming), context):
                        yield reply
                except _UndecodableRequest as err:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        elif inspect.iscoroutinefunction(behavior):
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(await _checked(request, context, handler.request_streaming), context)
                except _UndecodableRequest as err:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        elif kind == (False, False):  # a plain function (grpc.health's unimplemented List, say)
            def checked(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
                return behavior(request, context)
        else:
            return handler
        deserialize = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as err:  # protobuf's DecodeError; whatever a deserializer raises, the same verdict
                return _Undecodable(err)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[kind]
        return make(checked, request_deserializer=lenient, response_serializer=handler.response_serializer)


async def _checked(request: Any, context: grpc.aio.ServicerContext, streaming: bool) -> Any:
    """The request, or for a request stream an iterator over it that stops at an undecodable one.

    The iterator does not abort the call itself: a servicer may read its requests in a task of its
    own (the Worker's Drive does) while the handler writes replies, and grpc.aio loses an abort
    sent from that task during a write (the client hears nothing until its deadline). It sets the
    status and raises _UndecodableRequest instead: the wrapper aborts from the handler's task,
    and a servicer that swallows the exception still ends with the status set."""
    if not streaming:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(request))
        return request

    async def each() -> Any:
        async for message in request:
            if isinstance(message, _Undecodable):
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(_details(message))
                raise _UndecodableRequest(_details(message))
            yield message
    return each()


class Daemon:
    """A grpc.aio server with health and reflection; ``run`` blocks until SIGTERM/SIGINT.
    ``security`` None: the process's (edgeheads.common.security.install_security)."""

    def __init__(self, listen: str, service_names: list[str], grpc_settings: GrpcSettings | None = None,
                 grace_seconds: float = 5.0, security: Security | None = None) -> None:
        self.listen = listen
        self.service_names = service_names
        self.grace_seconds = grace_seconds
        self.security = current_security() if security is None else security
        # every call, health and reflection included, must carry the cluster token (if there is one);
        # then a request that does not decode is refused with INVALID_ARGUMENT
        interceptors = [*([TokenCheck(self.security.token)] if self.security.token else []), DecodeCheck()]
        # explicit message limits and keepalive, from the config (never gRPC's 4 MiB default)
        self.server = grpc.aio.server(options=(grpc_settings or GrpcSettings()).server_options(),
                                      interceptors=interceptors)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        self.address = ""
        self.on_stop: list[Callable[[], Any]] = []
        self._stopping: asyncio.Event | None = None
        # systemd's notify socket, when a Type=notify unit started us (else every call is a no-op)
        self.notifier = Notifier()

    def add(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> None:
        add_fn(servicer, self.server)

    async def start(self, ready_file: str | None = None, ready: bool = True) -> str:
        """Serve; with ``ready`` (the default) also say so (``mark_ready``). A daemon that is
        ready only later (the worker, once registered) passes False and calls ``mark_ready``."""
        host = self.listen.rsplit(":", 1)[0]
        port = bind(self.server, self.listen, self.security)
        warning = exposure_warning(self.listen, self.security, f"serving {', '.join(self.service_names) or 'gRPC'}")
        if warning:
            log.warning("%s", warning)
        await self.server.start()
        self.address = f"{host}:{port}"
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        # stop signals are handled before the ready file says the daemon is up: a launcher may
        # send SIGTERM as soon as it sees the file
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.notifier.start_watchdog()
        if ready:
            self.mark_ready(ready_file)
        else:
            self.notifier.status(f"listening on {self.address}, getting ready")
        # long-lived daemons: move start-up objects (model, weights) out of the GC's way and
        # collect less often, so per-message garbage does not trigger full scans mid-step
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info("serving %s on %s (%s)", ", ".join(self.service_names), self.address,
                 "mutual TLS" if self.security.tls else "plaintext")
        return self.address

    def mark_ready(self, ready_file: str | None = None, status: str | None = None) -> None:
        """The daemon is up: write the ready file (launchers wait for it) and send systemd READY=1."""
        if ready_file:
            write_ready_file(ready_file, self.address)
        self.notifier.ready(status or f"serving on {self.address}")

    async def unless_stopped(self, awaitable: Awaitable[Any]) -> bool:
        """Await ``awaitable`` unless a stop signal comes first (it is then cancelled): True
        when it finished. Start-up waits (for the controller, say) use it, so that a daemon
        that never gets going still stops on SIGTERM."""
        assert self._stopping is not None, "start() first"
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not work.done():
            work.cancel()
            return False
        work.result()
        return True

    async def wait(self) -> None:
        """Until a signal arrives; then stop gracefully: health goes NOT_SERVING, in-flight
        calls get ``grace_seconds`` to finish, stop hooks run."""
        assert self._stopping is not None, "start() first"
        await self._stopping.wait()
        log.info("stopping %s", self.address)
        self.notifier.stopping(f"stopping {self.address}")
        await self.health.enter_graceful_shutdown()
        for hook in self.on_stop:
            result = hook()
            if asyncio.iscoroutine(result):
                await result
        await self.server.stop(self.grace_seconds)
        log.info("stopped %s", self.address)

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
