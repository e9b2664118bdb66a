"""The controller's placement answers as the head node last heard them, and a way to wait
for one that suits: a recovery waits for the controller's word on a cluster without the
workers it lost (headnode/recovery.py).

An answer is either a placement (a new epoch) or a failed re-plan: ``error`` set, the
epoch unchanged, and ``members`` the workers the controller could not fit the model on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from edgeheads.common.spec import BlockId
from edgeheads.v1 import controller_pb2


@dataclass(frozen=True)
class PlacementAnswer:
    epoch: int
    placement: dict[BlockId, str]  # block -> worker
    addresses: dict[str, str]  # worker -> host:port
    error: str = ""
    members: frozenset[str] = frozenset()  # the workers it was planned for

    @classmethod
    def from_reply(cls, reply: controller_pb2.PlacementReply) -> PlacementAnswer:
        return cls(reply.epoch, {BlockId.parse(a.block_id): a.worker for a in reply.assignments},
                   {a.worker: a.address for a in reply.assignments}, reply.error, frozenset(reply.members))

    @property
    def workers(self) -> set[str]:
        return set(self.placement.values())


def answers_loss(answer: PlacementAnswer, lost: set[str], after_epoch: int) -> bool:
    """True when ``answer`` is the controller's word on the cluster without ``lost``: a
    placement newer than ``after_epoch`` that leaves them out, or a re-plan without them
    that found no placement."""
    if answer.error:
        return not answer.members & lost
    return answer.epoch > after_epoch and not answer.workers & lost


def returning(answer: PlacementAnswer, lost: set[str], after_epoch: int) -> set[str]:
    """The ``lost`` workers a placement newer than ``after_epoch`` places blocks on again: the
    controller has them registered again (restarted under the same name)."""
    if answer.error or answer.epoch <= after_epoch:
        return set()
    return answer.workers & lost


class PlacementFeed:
    def __init__(self) -> None:
        self.latest: PlacementAnswer | None = None
        self._changed = asyncio.Condition()

    async def publish(self, answer: PlacementAnswer) -> None:
        async with self._changed:
            self.latest = answer
            self._changed.notify_all()

    async def wait_for(self, suits: Callable[[PlacementAnswer], bool],
                       timeout_seconds: float) -> PlacementAnswer | None:
        """The latest answer once it suits; None if none does within ``timeout_seconds``."""
        def ready() -> bool:
            return self.latest is not None and suits(self.latest)
        try:
            async with self._changed:
                if ready():
                    return self.latest
                await asyncio.wait_for(self._changed.wait_for(ready), max(0.0, timeout_seconds))
                return self.latest
        except asyncio.TimeoutError:
            return None
