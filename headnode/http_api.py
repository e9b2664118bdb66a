"""The head node's OpenAI-compatible HTTP API: a second front door to the generation loop that
serves gRPC ``Generate`` (generation.agenerate_stream over the cluster's step).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, with
``temperature``, ``top_p``, ``max_tokens``, ``seed``, ``stop`` and ``stream`` (server-sent
events). Starlette serves them, under uvicorn in the head node daemon's own event loop.

A request is admitted (headnode/admission_control.py) before its reply starts, streamed or
not: one over ``headnode.max_sessions`` gets 429 (``too_many_sessions``), one whose K/V
caches do not fit the workers' memory gets 503 (``insufficient_memory``), as gRPC clients
get RESOURCE_EXHAUSTED.

With a cluster token (``security.token`` or ``token_file``), every route requires
``Authorization: Bearer TOKEN`` (what OpenAI clients send for their ``api_key``), compared in
constant time; a request without it gets 401 (``invalid_api_key``) and is logged like a refused
RPC (edgeheads.common.auth.RefusalLog). Without a token the API is open: the daemon warns at
start when it listens beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from edgeheads.common.auth import RefusalLog, token_matches
from edgeheads.common.config import split_host_port
from edgeheads.common.security import is_loopback
from edgeheads.headnode.admission import AdmissionError, SessionLimitError
from edgeheads.headnode.cluster import ClusterError
from edgeheads.headnode.generation import agenerate_stream, encode_prompt
from edgeheads.headnode.openai_schema import ApiError, ChatRequest, CompletionRequest, parse
from edgeheads.headnode.sampling import SamplingParams

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context


class StopScanner:
    """Cuts generated text at the first stop string. Text that could still become the start of
    one is held back until it cannot."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        self.pending += text
        cuts = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if cuts:
            self.hit = True
            out, self.pending = self.pending[:min(cuts)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One request's run: text deltas from ``deltas()``, then finish_reason and token counts."""

    def __init__(self, model: Any, cluster: Any, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str]) -> None:
        self.model, self.cluster, self.prompt_ids, self.params = model, cluster, prompt_ids, params
        self.scanner = StopScanner(stops)
        self.finish_reason = "length"
        self.completion_tokens = 0
        self.session = uuid.uuid4().hex

    async def admit(self) -> None:
        """Reserve the session's K/V memory; a ClusterError (RESOURCE_EXHAUSTED) when it does not fit."""
        await self.cluster.admit(self.session, len(self.prompt_ids), self.params.max_new_tokens)

    async def close(self) -> None:
        """End the session (its reservation and caches); a no-op when it has ended."""
        with anyio.CancelScope(shield=True):
            await self.cluster.end_session(self.session)

    async def deltas(self) -> AsyncIterator[str]:
        session = self.session
        results: list = []
        stream = agenerate_stream(self.cluster.step, self.model.tokenizer, self.prompt_ids, self.params,
                                  self.model.eos_token_ids, session, on_finish=results.append)
        log.info("http session %s: %d prompt tokens, up to %d new", session, len(self.prompt_ids),
                 self.params.max_new_tokens)
        try:
            async with contextlib.aclosing(stream):
                async for event in stream:
                    self.completion_tokens += 1
                    if out := self.scanner.feed(event.text):
                        yield out
                    if self.scanner.hit:
                        self.finish_reason = "stop"
                        return
        finally:  # also when the client went away (cancelled, or the generator closed)
            await self.close()
        if results:
            self.finish_reason = "stop" if results[0].finish_reason == "eos" else "length"
            out = self.scanner.feed(results[0].unstreamed_text)
            if self.scanner.hit:
                self.finish_reason = "stop"
            if out := out + self.scanner.flush():
                yield out

    def usage(self) -> dict[str, int]:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens,
                "total_tokens": n + self.completion_tokens}


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends (a client that left included), so
    the generation's session ends now rather than when the garbage collector gets to it; then
    ``on_close`` (a body that never started has no ``finally`` of its own to run)."""

    def __init__(self, *args, on_close=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                if self.on_close is not None:
                    await self.on_close()


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def refusal(err: ClusterError) -> ApiError:
    """The HTTP error for a request the cluster did not admit."""
    if isinstance(err, SessionLimitError):
        return ApiError(429, str(err), "rate_limit_error", code="too_many_sessions")
    if isinstance(err, AdmissionError):
        return ApiError(503, str(err), "server_error", code="insufficient_memory")
    return ApiError(503, f"generation failed: {err}", "server_error")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class TokenGuard:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer TOKEN``; others
    get 401 in OpenAI's error shape, before anything of theirs is read. A pure ASGI wrapper (not
    BaseHTTPMiddleware), so streamed replies and client disconnects pass through unchanged."""

    def __init__(self, app: Any, token: str, refusals: RefusalLog | None = None) -> None:
        self.app = app
        self._token = token
        self.refusals = refusals or RefusalLog(log)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization")
        presented = None
        if header is not None:
            presented = header[len(b"Bearer "):] if header[:7].lower() == b"bearer " else b""
        if token_matches(presented, self._token):
            await self.app(scope, receive, send)
            return
        reason = "no cluster token" if presented is None else "a wrong cluster token"
        self.refusals.refused(reason, scope.get("client") or "?",
                              f"an HTTP request to {scope.get('method', '?')} {scope.get('path', '?')}")
        err = ApiError(401, f"{reason}: this API needs the cluster token as its API key "
                            "(Authorization: Bearer TOKEN)", "invalid_request_error", code="invalid_api_key")
        await _error_response(err)(scope, receive, send)


def exposure_warning(listen: str, token: str | None) -> str | None:
    """The warning the head node logs at start when the HTTP API listens beyond loopback
    without a cluster token, else None."""
    if token or is_loopback(split_host_port(listen)[0]):
        return None
    return (f"serving the OpenAI-compatible HTTP API on {listen} WITHOUT A TOKEN: any host that reaches this "
            "port can drive generations. Set security.token or security.token_file (clients then send it as "
            "their API key), or set headnode.http_listen to 127.0.0.1:PORT")


class OpenAIApi:
    def __init__(self, model: Any, cluster: Any, token: str | None = None) -> None:
        self.model = model
        self.cluster = cluster
        self.token = token  # None: no authentication
        self.created = int(time.time())

    def app(self) -> Starlette:
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            return _error_response(ApiError(exc.status_code, exc.detail or "not found",
                                            "invalid_request_error" if exc.status_code < 500 else "server_error"))

        async def any_error(request: Request, exc: Exception) -> JSONResponse:
            log.exception("HTTP API: %s %s failed", request.method, request.url.path)
            return _error_response(ApiError(500, f"internal error: {exc}", "server_error"))

        middleware = [Middleware(TokenGuard, token=self.token)] if self.token else []
        return Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={HTTPException: http_error, Exception: any_error}, middleware=middleware)

    # ------------------------------------------------------------------ routes
    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "edgeheads"}]})

    async def completions(self, request: Request):
        try:
            req = parse(CompletionRequest, await request.body())
            prompt_ids = encode_prompt(self.model.tokenizer, req.prompt, chat=False)
            gen = self._generation(req, prompt_ids, req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        except ApiError as err:
            return _error_response(err)
        return await self._reply(req, gen, "cmpl", chat=False)

    async def chat_completions(self, request: Request):
        try:
            req = parse(ChatRequest, await request.body())
            if not getattr(self.model.tokenizer, "chat_template", None):
                raise ApiError(400, f"model {self.model.name} has no chat template; use /v1/completions",
                               param="messages")
            text = self.model.tokenizer.apply_chat_template(req.chat_messages(), tokenize=False,
                                                           add_generation_prompt=True)
            prompt_ids = list(self.model.tokenizer(text, add_special_tokens=False).input_ids)
            gen = self._generation(req, prompt_ids, req.max_completion_tokens or req.max_tokens)
        except ApiError as err:
            return _error_response(err)
        return await self._reply(req, gen, "chatcmpl", chat=True)

    # ------------------------------------------------------------------ shared
    def _generation(self, req, prompt_ids: list[int], max_tokens: int | None) -> Generation:
        if req.model is not None and req.model != self.model.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        context = self.model.parts.shape.max_positions
        room = context - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" plus max_tokens {max_tokens}" if max_tokens is not None else ""
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(prompt_ids)}"
                           f"{asked}", param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens or room,
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)
        return Generation(self.model, self.cluster, prompt_ids, params, req.stop_strings())

    async def _reply(self, req, gen: Generation, prefix: str, chat: bool):
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model.name}
        try:
            await gen.admit()  # before the reply starts: a refusal gets its own status, streamed or not
        except ClusterError as err:
            await gen.close()
            return _error_response(refusal(err))
        if req.stream:
            return _ClosingStreamingResponse(self._events(req, gen, head, chat), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache"}, on_close=gen.close)
        try:
            text = "".join([delta async for delta in gen.deltas()])
        except ClusterError as err:
            return _error_response(refusal(err))
        finally:
            await gen.close()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": gen.finish_reason}
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": gen.usage()})

    async def _events(self, req, gen: Generation, head: dict, chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            extra = {"usage": None} if req.include_usage else {}
            return _sse({**head, "object": obj, **extra,
                         "choices": [choice | {"logprobs": None, "finish_reason": finish}]})

        if chat:
            yield chunk(None, first=True)
        deltas = gen.deltas()
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield chunk(delta)
        except ClusterError as err:
            yield _sse(ApiError(503, f"generation failed: {err}", "server_error").body())
            return
        yield chunk(None, gen.finish_reason)
        if req.include_usage:
            yield _sse({**head, "object": obj, "choices": [], "usage": gen.usage()})
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------- the server
class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the head node daemon owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The API served by uvicorn as a task of the running event loop, on ``listen``."""

    def __init__(self, listen: str, app: Starlette, grace_seconds: float = 5.0) -> None:
        host, port = split_host_port(listen)
        info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.sock = socket.socket(info[0], socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(info[4])
        except OSError as err:
            self.sock.close()
            raise OSError(f"cannot serve the HTTP API on {listen}: {err} (set headnode.http_listen to another "
                          "port, or null to turn it off)") from err
        bound_host = listen.rsplit(":", 1)[0]
        self.address = f"{bound_host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=grace_seconds)
        self.server = _Server(config)
        self.task = None

    async def start(self) -> str:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError(f"the HTTP API on {self.address} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("serving the OpenAI-compatible HTTP API on http://%s/v1", self.address)
        return self.address

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        await self.task
        self.sock.close()
