"""Sessions nobody drives any more: a worker drops a session that has seen no call for
``worker.session_ttl_seconds`` and frees its K/V caches.

The head node ends every session it knows of on every worker (DropSession). A head node
that dies (``kill -9``, a crash, a board unplugged) cannot: its sessions' caches and the
relay steps it left half-done would stay on the workers for good. A session's clock is
its last call (``BlockHost.touch``, at the start and the end of every call, in both
dataflows); one the worker holds without ever having seen a call of it (caches that a
migration brought in) starts its clock when the sweep first sees it. A live generation
calls every worker holding its caches at every step, so only a session whose head node
stopped stepping it for the whole TTL is dropped. It is dropped the way the head node
would: ended, so that a late call cannot bring its caches back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from edgeheads.worker.host import BlockHost
from edgeheads.worker.relay_endpoint import RelayEndpoint

log = logging.getLogger(__name__)

MAX_SWEEP_PERIOD_SECONDS = 30.0


def sessions_held(host: BlockHost, relay: RelayEndpoint) -> set[str]:
    """Every session with caches here or with a relay step waiting for inputs."""
    return host.sessions() | {key[0] for key in relay.executor.steps}


def expire_idle_sessions(host: BlockHost, relay: RelayEndpoint, ttl_seconds: float,
                         now: float | None = None) -> list[str]:
    """End the sessions held here whose last call is more than ``ttl_seconds`` ago; their ids."""
    now = time.monotonic() if now is None else now
    held = sessions_held(host, relay)
    expired = sorted(s for s in held if now - host.last_used.setdefault(s, now) > ttl_seconds)
    for session in expired:
        relay.drop_session(session)
        host.end_session(session)
    for session in [s for s, t in host.last_used.items() if s not in held and now - t > ttl_seconds]:
        del host.last_used[session]  # calls refused before they made a cache, or sessions already dropped
    return expired


def sweep_period(ttl_seconds: float) -> float:
    """A session is dropped at most a quarter of its TTL late (and within 30 s)."""
    return min(max(ttl_seconds / 4, 0.05), MAX_SWEEP_PERIOD_SECONDS)


async def sweep_idle_sessions(host: BlockHost, relay: RelayEndpoint, ttl_seconds: float) -> None:
    """Run for the daemon's lifetime."""
    while True:
        await asyncio.sleep(sweep_period(ttl_seconds))
        expired = expire_idle_sessions(host, relay, ttl_seconds)
        if expired:
            log.warning("worker %s: dropped %d session(s) with no call for %g s (session_ttl_seconds; their head "
                        "node is gone?): %s; %d bytes in use now", host.name, len(expired), ttl_seconds,
                        ", ".join(expired), host.memory_used_bytes())
