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

    @asynccontextmanager
    async def step(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching)
            self._running += 1
        try:
            yield
        finally:
            async with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def switch(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching)
            self._switching = True
            await self._cond.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._switching = False
                self._cond.notify_all()

    @property
    def steps_running(self) -> int:
        return self._running
