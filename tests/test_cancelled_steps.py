"""A step cancelled under anyio (the HTTP API: a client that disconnects) leaves the StepGate,
even when the gate's lock is busy at that moment: anyio cancels every later await of a
cancelled task, and a step count left behind would hold every later epoch switch back.
(tests/test_orphaned_sessions.py shows the whole path: nothing is left on any worker.)"""

from __future__ import annotations

import anyio

from edgeheads.headnode.step_gate import StepGate


def test_a_step_cancelled_under_anyio_leaves_the_gate_while_its_lock_is_busy():
    async def main() -> None:
        gate = StepGate()
        entered = anyio.Event()
        scope = anyio.CancelScope()

        async def step() -> None:
            with scope:
                async with gate.step():
                    entered.set()
                    await anyio.sleep(30)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(step)
            await entered.wait()
            async with gate._cond:  # busy while the cancelled step leaves
                scope.cancel()
                await anyio.sleep(0.1)
        assert gate.steps_running == 0
        with anyio.fail_after(5):  # a switch is not held back by a step that is gone
            async with gate.switch():
                pass
    anyio.run(main)
