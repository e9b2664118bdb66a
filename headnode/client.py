"""The Python client of a running head node.

    from edgeheads.headnode import Client
    text = Client("127.0.0.1:50050").generate("Hello", max_new_tokens=32)
    for piece in Client("127.0.0.1:50050").generate("Hello", stream=True):
        print(piece, end="", flush=True)

Against a cluster with mutual TLS or a token, the client reads the same ``security`` (and
``grpc``) settings as the daemons: from ``EDGEHEADS_SECURITY__*`` variables, or a config file
(``Client(address, config="edgeheads.yaml")``), or given as a loaded ``Security``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc
from edgeheads.common.channels import open_sync_channel
from edgeheads.common.config import GrpcSettings
from edgeheads.common.security import Security, load_client_config


class ClientError(RuntimeError):
    """The head node refused or failed the request; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Generation:
    """Everything one call produced (``Client.generate_full``)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        n = len(self.token_ids) - 1
        rate = n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "finish_reason": self.finish_reason, "prefill_seconds": round(self.prefill_seconds, 4),
                "decode_seconds": round(self.decode_seconds, 4), "decode_tokens_per_second": round(rate, 2)}


class Client:
    """``security`` and ``grpc_settings`` not given: read from ``config`` (a YAML file, optional)
    and ``EDGEHEADS_*`` variables, as the daemons read theirs (ConfigError when they are wrong)."""

    def __init__(self, address: str, timeout_seconds: float | None = None, *, security: Security | None = None,
                 grpc_settings: GrpcSettings | None = None, config: str | os.PathLike[str] | None = None) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        if security is None or grpc_settings is None:
            loaded_grpc, loaded_security = load_client_config(config)
            security = loaded_security if security is None else security
            grpc_settings = loaded_grpc if grpc_settings is None else grpc_settings
        self._channel = open_sync_channel(address, grpc_settings, security)
        self._stub = headnode_pb2_grpc.HeadnodeStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: int | None, chat: bool | None, ignore_eos: bool = False) -> Iterator[headnode_pb2.GenerateEvent]:
        request = headnode_pb2.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                               top_k=top_k, top_p=top_p, seed=seed, chat=chat, ignore_eos=ignore_eos)
        try:
            yield from self._stub.Generate(request, timeout=self.timeout_seconds)
        except grpc.RpcError as err:
            raise ClientError(err.code().name, err.details()) from None

    def generate_full(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None, chat: bool | None = None,
                      on_text: Callable[[str], None] | None = None, ignore_eos: bool = False) -> Generation:
        """Everything the call produced; ``on_text`` sees each text piece as it arrives. With
        ``ignore_eos`` the generation runs to ``max_new_tokens`` through end-of-sequence tokens."""
        out = Generation()
        pieces = []
        for event in self._events(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, ignore_eos):
            if event.done:
                out.finish_reason, out.prompt_tokens = event.finish_reason, event.prompt_tokens
                out.prefill_seconds, out.decode_seconds = event.prefill_seconds, event.decode_seconds
            else:
                out.token_ids.append(event.token_id)
            if event.text:  # the done event may carry text no token completed (see the service)
                pieces.append(event.text)
                if on_text is not None:
                    on_text(event.text)
        out.text = "".join(pieces)
        return out

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool | None = None,
                 stream: bool = False) -> str | Iterator[str]:
        """The generated text; with ``stream=True`` an iterator over text pieces as they arrive."""
        if stream:
            return (e.text for e in self._events(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat)
                    if e.text or not e.done)
        return self.generate_full(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat).text

    def status(self) -> dict[str, Any]:
        try:
            reply = self._stub.Status(headnode_pb2.StatusRequest(), timeout=10)
        except grpc.RpcError as err:
            raise ClientError(err.code().name, err.details()) from None
        return {"model": reply.model, "epoch": reply.epoch, "workers": list(reply.workers),
                "active_sessions": reply.active_sessions, "placement": json.loads(reply.placement_json or "{}"),
                "phases_run": reply.phases_run, "mean_phase_seconds": reply.mean_phase_seconds,
                "phases_per_token": reply.phases_per_token,
                "mean_phase_compute_seconds": reply.mean_phase_compute_seconds,
                "migrations": reply.migrations, "migration_failures": reply.migration_failures,
                "migrated_bytes": reply.migrated_bytes, "max_stall_seconds": reply.max_stall_seconds,
                "last_migration_error": reply.last_migration_error, "dataflow": reply.dataflow}
