"""Prometheus metrics plumbing: each daemon has its own registry and serves it over HTTP on
its own port (``metrics_listen``). Each daemon package defines its metric objects in its own
``metrics.py``, so the code that updates them only calls ``observe``/``inc``/``set``."""

from __future__ import annotations

import logging
from prometheus_client import CollectorRegistry, start_http_server

from edgeheads.common.config import split_host_port

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
PHASE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5)


def serve(listen: str | None, registry: CollectorRegistry) -> str | None:
    """Start the HTTP exporter; the bound HOST:PORT (port 0 picks a free one), or None when off."""
    if not listen:
        return None
    host, port = split_host_port(listen)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {listen}: {err} (set metrics_listen to another port, "
                      "or to null to turn metrics off)") from None
    bound = f"{host}:{server.server_port}"
    log.info("metrics on http://%s/metrics", bound)
    return bound
