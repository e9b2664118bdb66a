"""A client that goes away during a recovery stops only its own wait: a switch cancelled
while steps run lets later steps in; a step's wait for the recovery is shielded, so the
recovery runs to its end; a recovery that fails with an unexpected error, or runs past its
time limit, ends every live session rather than leave them rewired without caches.
Ordered by events only (fakes, no workers)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.recovery import Recovery
from edgeheads.headnode.step_gate import StepGate


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_switch_cancelled_while_a_step_runs_holds_no_later_step_back():
    async def run() -> None:
        gate = StepGate()
        inside, release = asyncio.Event(), asyncio.Event()

        async def step() -> None:
            async with gate.step():
                inside.set()
                await release.wait()

        async def switch() -> None:
            async with gate.switch():
                pass

        running = asyncio.create_task(step())
        await inside.wait()
        switching = asyncio.create_task(switch())
        await _settle()
        assert not switching.done()  # waits for the step in flight
        switching.cancel()
        await asyncio.gather(switching, return_exceptions=True)
        assert switching.cancelled()

        async def later() -> None:
            async with gate.step():
                pass
        await asyncio.wait_for(later(), 5)  # not held back by the abandoned switch
        release.set()
        await running
        await asyncio.wait_for(switch(), 5)  # and a later switch still gets its turn
        assert gate.steps_running == 0
    asyncio.run(run())


class _Sessions:
    def __init__(self, names) -> None:
        self.live = set(names)

    def __iter__(self):
        return iter(sorted(self.live))

    async def end(self, name, epoch) -> None:
        self.live.discard(name)


def _cluster(names=("a", "b")) -> SimpleNamespace:
    epoch = SimpleNamespace(number=1, placement={}, addresses={}, plan=SimpleNamespace(workers=["w"]))
    return SimpleNamespace(gate=StepGate(), epoch=epoch, sessions=_Sessions(names), failed={}, down=None,
                           metrics=None, placement_lock=asyncio.Lock())


def test_a_step_cancelled_while_waiting_for_the_recovery_does_not_stop_it():
    async def run() -> None:
        started, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

        class Slow(Recovery):
            async def _after_failure(self, session, rebuilds, failure) -> bool:
                async with self.cluster.gate.switch():
                    started.set()
                    await release.wait()
                finished.set()
                return True

        cluster = _cluster()
        recovery = Slow(cluster, SimpleNamespace(latest=None))
        waiting = asyncio.create_task(recovery.after_failure("a", 0, ClusterError("lost")))
        await started.wait()
        waiting.cancel()  # the client of session a went away
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled()
        release.set()
        await asyncio.wait_for(finished.wait(), 5)  # the recovery ran to its end

        async def later() -> None:
            async with cluster.gate.step():
                pass
        await asyncio.wait_for(later(), 5)
        await _settle()
        assert not recovery._tasks
    asyncio.run(run())


def test_an_unexpected_error_in_a_rebuild_ends_every_live_session():
    async def run() -> None:
        class Broken(Recovery):
            async def _rebuild(self, answer, lost, trigger, restarted=frozenset()):
                raise RuntimeError("a bug")

        cluster = _cluster()
        error = await Broken(cluster, SimpleNamespace(latest=None))._recover(set(), "test", 0.0, {"w"})
        assert isinstance(error, ClusterError) and "a bug" in str(error)
        assert set(cluster.failed) == {"a", "b"} and not cluster.sessions.live
        assert not cluster.gate._switching
    asyncio.run(run())


def test_a_rebuild_that_hangs_is_bounded_by_the_recovery_time_limit():
    async def run() -> None:
        class Hung(Recovery):
            async def _rebuild(self, answer, lost, trigger, restarted=frozenset()):
                await asyncio.Event().wait()

        cluster = _cluster()
        recovery = Hung(cluster, SimpleNamespace(latest=None), timeout_seconds=0.2)
        error = await asyncio.wait_for(recovery._recover(set(), "test", 0.0, {"w"}), 10)
        assert isinstance(error, ClusterError) and "did not finish" in str(error)
        assert set(cluster.failed) == {"a", "b"} and not cluster.sessions.live
    asyncio.run(run())
