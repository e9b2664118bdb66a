"""StepGate: steps run concurrently; an exclusive hold (an epoch switch) waits for the
steps in flight and holds new ones back until it is released. Ordered by events only."""

from __future__ import annotations

import asyncio

from edgeheads.headnode.step_gate import StepGate


async def _settle() -> None:
    """Let every ready task run until it blocks (no timing involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_steps_run_concurrently():
    async def run() -> None:
        gate = StepGate()
        inside, release = asyncio.Event(), asyncio.Event()
        entered = 0

        async def step() -> None:
            nonlocal entered
            async with gate.step():
                entered += 1
                if entered == 3:
                    inside.set()
                await release.wait()

        tasks = [asyncio.create_task(step()) for _ in range(3)]
        await asyncio.wait_for(inside.wait(), 5)  # all three are inside at once
        assert gate.steps_running == 3
        release.set()
        await asyncio.gather(*tasks)
        assert gate.steps_running == 0
    asyncio.run(run())


def test_exclusive_hold_waits_for_steps_in_flight_and_holds_new_ones_back():
    async def run() -> None:
        gate = StepGate()
        log: list[str] = []
        step_inside, finish_step = asyncio.Event(), asyncio.Event()
        switch_inside, finish_switch = asyncio.Event(), asyncio.Event()

        async def old_step() -> None:
            async with gate.step():
                log.append("old step in")
                step_inside.set()
                await finish_step.wait()
                log.append("old step out")

        async def switch() -> None:
            async with gate.switch():
                log.append("switch in")
                switch_inside.set()
                await finish_switch.wait()
                log.append("switch out")

        async def new_step() -> None:
            async with gate.step():
                log.append("new step in")

        old = asyncio.create_task(old_step())
        await asyncio.wait_for(step_inside.wait(), 5)
        holder = asyncio.create_task(switch())
        await _settle()
        assert not switch_inside.is_set(), "the switch must wait for the step in flight"
        new = asyncio.create_task(new_step())
        await _settle()
        assert log == ["old step in"], "a step that arrives while a switch waits must wait too"
        finish_step.set()
        await asyncio.wait_for(switch_inside.wait(), 5)
        await _settle()
        assert log == ["old step in", "old step out", "switch in"]
        assert gate.steps_running == 0 and not new.done()
        finish_switch.set()  # release: the held step goes on
        await asyncio.wait_for(asyncio.gather(old, holder, new), 5)
        assert log == ["old step in", "old step out", "switch in", "switch out", "new step in"]
    asyncio.run(run())


def test_two_exclusive_holds_take_turns_and_a_failing_step_still_releases():
    async def run() -> None:
        gate = StepGate()
        first_in, finish_first = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def hold(name: str, inside: asyncio.Event | None = None, finish: asyncio.Event | None = None) -> None:
            async with gate.switch():
                order.append(f"{name} in")
                if inside is not None:
                    inside.set()
                    await finish.wait()
                order.append(f"{name} out")

        async def failing_step() -> None:
            async with gate.step():
                raise RuntimeError("worker gone")

        try:
            await failing_step()
        except RuntimeError:
            pass
        assert gate.steps_running == 0
        a = asyncio.create_task(hold("a", first_in, finish_first))
        await asyncio.wait_for(first_in.wait(), 5)
        b = asyncio.create_task(hold("b"))
        await _settle()
        assert order == ["a in"]
        finish_first.set()
        await asyncio.wait_for(asyncio.gather(a, b), 5)
        assert order == ["a in", "a out", "b in", "b out"]
    asyncio.run(run())
