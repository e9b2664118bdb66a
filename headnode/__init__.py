"""The head node: loading, slicing, the engines, the daemon and the client.

``from edgeheads.headnode import Client`` is the documented client import."""

from __future__ import annotations

from typing import Any

__all__ = ["Client"]


def __getattr__(name: str) -> Any:  # lazy, so that importing a submodule does not pull in gRPC
    if name == "Client":
        from edgeheads.headnode.client import Client

        return Client
    raise AttributeError(name)
