"""A gate between decoding steps and epoch switches: any number of steps (of any
sessions) may run at once, and a switch waits for them to finish and holds new ones
back until it is done. So no step ever runs under a mix of epochs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class StepGate:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._running = 0
        self._switching = False
        self._notifying: set[asyncio.Task] = set()

    @asynccontextmanager
    async def step(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching)
            self._running += 1
        try:
            yield
        finally:
            self._leave(step=True)

    @asynccontextmanager
    async def switch(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching)
            self._switching = True
            try:
                await self._cond.wait_for(lambda: self._running == 0)
            except BaseException:  # cancelled while steps ran: let the steps held back go on
                self._leave(step=False)
                raise
        try:
            yield
        finally:
            self._leave(step=False)

    def _leave(self, step: bool) -> None:
        """A step or a switch ends, without awaiting: a task that was cancelled may not get
        to await here (under anyio every await of a cancelled task is cancelled again), and
        a count left behind would hold every later switch back for good. Waiters are told
        from a task of their own."""
        if step:
            self._running -= 1
        else:
            self._switching = False
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    @property
    def steps_running(self) -> int:
        return self._running
