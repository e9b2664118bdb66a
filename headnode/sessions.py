"""Placement epochs and decoding sessions, with the one way a session ends.

A session is one generation: its K/V caches live on the workers holding attention
blocks, one cache per block it has run on. However a session ends (it finished, a
step of it failed in either dataflow, its client went away, the head node closes),
``SessionTable.end`` forgets it and drops its caches on every worker that may hold
them: every worker of every epoch it ran under, and of the epoch in use now (a
migration may have moved its caches to a worker it never ran on).

Workers know a session's caches by its *wire id*: its name until a recovery rebuilds
them (headnode/recovery.py), then a fresh id each time (``rewire``), so that nothing a
step of the old id left behind can mix with the rebuilt caches. A session keeps the
token ids of every step that succeeded (``history``), which is what a rebuild replays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import grpc

from edgeheads.common.spec import BlockId
from edgeheads.headnode.cluster_errors import cancelled_here
from edgeheads.headnode.step_plan import StepPlan
from edgeheads.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DROP_TIMEOUT_SECONDS = 10.0


@dataclass
class Epoch:
    number: int
    placement: dict[BlockId, str]  # block -> worker name
    addresses: dict[str, str]  # worker name -> host:port
    plan: StepPlan


@dataclass
class Session:
    name: str
    position: int = 0  # tokens already fed: the next step's first position
    epoch: int = -1  # the epoch of its last step
    workers: set[str] = field(default_factory=set)  # every worker that may hold its caches
    wire: str = ""  # the id its caches have on workers (its name until a rebuild)
    history: list[tuple[int, ...]] = field(default_factory=list)  # the token ids of each step done
    rebuilds: int = 0
    last_step_end: float = 0.0  # time.perf_counter() when its last step returned (0: none yet)

    def __post_init__(self) -> None:
        self.wire = self.wire or self.name

    @property
    def tokens(self) -> int:
        return sum(len(chunk) for chunk in self.history)


class SessionTable:
    """The live sessions. ``forget`` is the dataflow's hook to close what it keeps per
    session (streams); it runs before the caches are dropped."""

    def __init__(self, stubs: dict[str, worker_pb2_grpc.WorkerStub],
                 forget: Callable[[str], Awaitable[None]]) -> None:
        self.stubs = stubs
        self.forget = forget
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, name: object) -> bool:
        return name in self._sessions

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sessions))

    def get(self, name: str) -> Session | None:
        return self._sessions.get(name)

    def open(self, name: str, epoch: Epoch) -> Session:
        """The session ``name`` (new at its first step), about to run a step under ``epoch``."""
        session = self._sessions.get(name)
        if session is None:
            session = self._sessions[name] = Session(name)
        if session.epoch != epoch.number:
            session.epoch = epoch.number
            session.workers.update(epoch.plan.workers)
        return session

    async def end(self, name: str, current: Epoch | None) -> None:
        """The one cleanup path. A no-op for a session already ended (or never started)."""
        session = self._sessions.pop(name, None)
        if session is None:
            return
        workers = session.workers | set(current.plan.workers if current is not None else ())
        try:
            await self.forget(session.wire)
        finally:
            await asyncio.gather(*[self._drop(w, session.wire) for w in sorted(workers) if w in self.stubs])

    async def rewire(self, name: str, reachable: set[str]) -> Session:
        """Start ``name`` over under a fresh wire id, at position 0 with its history kept (a
        rebuild replays it). The old id's caches are dropped on the ``reachable`` workers."""
        session = self._sessions[name]
        old, workers = session.wire, session.workers
        session.rebuilds += 1
        session.wire = f"{session.name}~{session.rebuilds}"
        session.position, session.epoch, session.workers = 0, -1, set()
        try:
            await self.forget(old)
        finally:
            await asyncio.gather(*[self._drop(w, old) for w in sorted(workers & reachable) if w in self.stubs])
        return session

    async def _drop(self, worker: str, session: str) -> None:
        try:
            await self.stubs[worker].DropSession(worker_pb2.DropSessionRequest(session=session),
                                                 timeout=DROP_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:  # a worker that is gone holds nothing any more
            log.warning("session %s: could not drop its caches on %s: %s", session, worker, err.code().name)
        except asyncio.CancelledError:  # its channel was closed (headnode/channels.py), unless cancelled here
            if cancelled_here():
                raise
            log.warning("session %s: could not drop its caches on %s: the call was cancelled", session, worker)
