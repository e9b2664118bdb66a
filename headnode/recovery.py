"""Recovering from a lost worker, driven by the head node, without changing a token.

The head node learns of a loss in one of two ways: a step fails (a broken stream or
relay connection, UNAVAILABLE, a step timeout) and probing the epoch's workers finds
one that does not answer; or the controller publishes a placement that leaves out a
worker of the epoch in use (its telemetry stream closed, or its heartbeats stopped)
and that worker does not answer either. A worker that answers but lacks blocks the
epoch in use puts on it was restarted under the same name: its blocks and caches are
lost just the same, but it stays in the cluster, so it is rebuilt in place (from the
newest placement the head node knows) instead of waiting for a placement without it.
While a recovery waits for the controller, the lost workers are probed again every
second, and at once when the controller places blocks on one of them again (it
restarted and registered again): one that answers is rebuilt in place too. So a worker
restarted while the controller is away (which publishes nothing then) is taken back.

Recovery then holds every step back (the StepGate) and:
1. waits for the controller's placement without the lost workers (it re-plans when a
   worker leaves, within the survivors' memory); a re-plan that finds none ends every
   live session with RESOURCE_EXHAUSTED, and the cluster stays down until a placement
   comes that fits (a worker joins);
2. gives every live session a fresh wire id and drops the old one's caches on the
   survivors (a step that failed half-way may have advanced some of them);
3. unloads what the new placement puts elsewhere, ships the blocks the survivors lack
   from the head node's own weights (the lost worker's blocks cannot be pulled from it),
   and switches to the new epoch;
4. ends the sessions whose K/V reservations the survivors cannot hold (RESOURCE_EXHAUSTED,
   the newest first), then replays every other live session's steps (the prompt, then each
   generated token: the same steps as before, so the rebuilt caches are the same numbers)
   under its new wire id.
The steps that failed then run again. A worker lost during a recovery is added to the
lost ones and the recovery starts over. See docs/recovery.md.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from edgeheads.common.spec import BlockId
from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.cluster_errors import CapacityError, ClusterError
from edgeheads.headnode.placement_feed import PlacementAnswer, PlacementFeed, answers_loss, returning
from edgeheads.headnode.recovery_plan import (RecoveryReport, block_changes, capacity_message, restarted_workers,
                                              step_bytes_per_token)
from edgeheads.v1 import worker_pb2

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 5.0
REPROBE_SECONDS = 1.0  # while waiting for the controller, lost workers are probed again this often
REPORTS_KEPT = 50


async def probe(cluster: ClusterExecutor, workers, timeout_seconds: float = PROBE_TIMEOUT_SECONDS
                ) -> dict[str, set[BlockId] | None]:
    """The blocks each worker holds, or None for a worker that does not answer.

    A worker found UNAVAILABLE is tried once more over a new channel: a channel whose
    worker died waits between connection attempts (up to 2 s), so a worker restarted at
    the same address could look dead for that long; a new channel connects at once (and a
    dead worker refuses it at once)."""
    async def ask(stub) -> set[BlockId]:
        reply = await stub.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=timeout_seconds)
        return {BlockId.parse(b) for b in reply.blocks}

    async def one(worker: str) -> set[BlockId] | None:
        stub = cluster.stubs.get(worker)
        if stub is None:
            return None
        try:
            return await ask(stub)
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.UNAVAILABLE:
                return None
        try:
            return await ask(cluster.channels.reopen(worker))
        except grpc.aio.AioRpcError:
            return None
    names = sorted(set(workers))
    return dict(zip(names, await asyncio.gather(*[one(w) for w in names])))


def _describe(lost: set[str], restarted: set[str]) -> str:
    parts = [f"{', '.join(sorted(lost))} cannot be reached"] if lost else []
    if restarted:
        parts.append(f"{', '.join(sorted(restarted))} restarted (lacks its blocks)")
    return "; ".join(parts)


class Recovery:
    def __init__(self, cluster: ClusterExecutor, feed: PlacementFeed, timeout_seconds: float = 120.0) -> None:
        self.cluster = cluster
        self.feed = feed
        self.timeout_seconds = timeout_seconds
        self.reports: list[RecoveryReport] = []
        self.failures: list[str] = []
        self._tasks: set[asyncio.Task] = set()  # after_failure's work, held until done

    # ------------------------------------------------------------------ entry points
    async def after_failure(self, session: str, rebuilds: int, failure: ClusterError) -> bool:
        """A step of ``session`` that began after ``rebuilds`` recoveries failed. True: run it
        again (every session was rebuilt since it began). False: no worker was lost, so the
        failure stands. Raises the error that ended the session when recovery failed.

        The work runs as a task of this Recovery's, which the step awaits through a shield:
        a client that goes away (its step cancelled) stops only its own wait. The recovery
        it started runs to its end; cancelled half-way it would leave the gate held (every
        later step blocked) or the sessions rewired without their caches. Recoveries run one
        at a time (the placement lock): a later failure waits for the running one and finds
        every session rebuilt since its step began (it runs again)."""
        task = asyncio.get_running_loop().create_task(self._after_failure(session, rebuilds, failure))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return await asyncio.shield(task)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a step whose client went away does not read it

    async def _after_failure(self, session: str, rebuilds: int, failure: ClusterError) -> bool:
        cluster = self.cluster
        since = asyncio.get_running_loop().time()
        async with cluster.placement_lock:
            if session in cluster.failed:
                raise cluster.failed.pop(session)
            if cluster.rebuilds != rebuilds:
                return True
            if cluster.down is not None:
                raise cluster.down
            epoch = cluster.epoch
            if epoch is None:
                return False
            held = await probe(cluster, epoch.plan.workers)
            lost = {w for w, blocks in held.items() if blocks is None}
            restarted = restarted_workers(epoch.placement, held)
            if not lost and not restarted:
                return False
            log.warning("a step of session %s failed (%s); %s: recovering", session, failure,
                        _describe(lost, restarted))
            error = await self._recover(lost, f"a step failed: {failure}", since, restarted)
        if error is not None:
            cluster.failed.pop(session, None)
            raise error
        return True

    async def on_placement(self, answer: PlacementAnswer) -> bool:
        """A new epoch from the controller. True when recovery took it in: it leaves out a
        worker of the epoch in use that cannot be reached, or the cluster is down and it
        fits again. False: nothing was lost, migrate to it as usual."""
        cluster = self.cluster
        since = asyncio.get_running_loop().time()
        async with cluster.placement_lock:
            epoch = cluster.epoch
            if epoch is None or answer.error or answer.epoch <= epoch.number:
                return True  # nothing to do (a recovery got there first)
            if cluster.down is not None:
                trigger = f"epoch {answer.epoch} fits the workers again"
                lost: set[str] = set()
                restarted: set[str] = set()
            else:
                # a worker of the epoch in use that the controller has at a new address restarted there
                cluster.channels.connect({w: a for w, a in answer.addresses.items() if w in epoch.plan.workers})
                held = await probe(cluster, epoch.plan.workers)
                gone = set(epoch.plan.workers) - answer.workers
                lost = {w for w in gone if held[w] is None}
                restarted = restarted_workers(epoch.placement, held)
                if not lost and not restarted:
                    return False
                trigger = (f"the controller's epoch {answer.epoch} leaves out {', '.join(sorted(lost))}" if lost
                           else f"epoch {answer.epoch}")
                log.warning("%s; %s: recovering", trigger, _describe(lost, restarted))
            await self._recover(lost, trigger, since, restarted)
            return True

    # ------------------------------------------------------------------ the recovery
    async def _recover(self, lost: set[str], trigger: str, since: float,
                       restarted: set[str] = frozenset()) -> ClusterError | None:
        """Rebuild every live session without ``lost`` and with ``restarted`` rebuilt in place
        (holding the placement lock; the loss was known at loop time ``since``); the error
        that ended them all when that was not possible."""
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_seconds
        lost, restarted = set(lost), set(restarted)
        examined = 0  # the newest epoch that placed lost workers again and was probed for them
        async with cluster.gate.switch():
            while True:
                current = cluster.epoch.number if cluster.epoch is not None else 0
                if not lost:  # only restarted workers: rebuild them where the newest placement puts blocks
                    answer = self._newest_placement()
                else:
                    answer = await self.feed.wait_for(
                        lambda a: answers_loss(a, lost, current) or bool(returning(a, lost, max(current, examined))),
                        min(REPROBE_SECONDS, deadline - loop.time()))
                    if answer is None:  # no word from the controller yet: has a lost worker come back?
                        if loop.time() >= deadline:
                            return await self._give_up(ClusterError(
                                f"lost {', '.join(sorted(lost))}, and the controller published no placement without "
                                f"{'it' if len(lost) == 1 else 'them'} within {self.timeout_seconds:g} s"))
                        if await self._came_back(set(lost), lost, restarted):
                            continue
                        answer = self._newest_placement()
                    elif answer.error:
                        return await self._give_up(CapacityError(capacity_message(answer, lost)), down=True)
                    elif back := returning(answer, lost, max(current, examined)):
                        examined = answer.epoch
                        self.cluster.channels.connect({w: answer.addresses[w] for w in back})
                        if await self._came_back(back, lost, restarted):
                            continue  # others are still lost: wait for a placement without them
                waited = loop.time() - since
                try:  # bounded as a whole: a worker that hangs (LoadBlock, a replayed step) must not hold the gate
                    report = await asyncio.wait_for(self._rebuild(answer, lost, trigger, restarted),
                                                    max(deadline - loop.time(), 0.0))
                except asyncio.TimeoutError:
                    log.error("recovery to epoch %d did not finish within %g s", answer.epoch, self.timeout_seconds)
                    return await self._give_up(ClusterError(
                        f"recovery to epoch {answer.epoch} ({_describe(lost, restarted)}) did not finish within "
                        f"{self.timeout_seconds:g} s"))
                except ClusterError as err:
                    reachable = await probe(cluster, answer.workers)
                    more = {w for w, held in reachable.items() if held is None} - lost
                    restarted -= more
                    if not more or loop.time() > deadline:
                        log.error("recovery to epoch %d failed: %s", answer.epoch, err)
                        return await self._give_up(err, down=isinstance(err, CapacityError))
                    log.warning("recovery to epoch %d failed (%s); %s cannot be reached either: starting over",
                                answer.epoch, err, ", ".join(sorted(more)))
                    lost |= more
                    continue
                except Exception as err:  # a bug: the sessions may be rewired but not replayed, so end them all
                    log.exception("recovery to epoch %d failed unexpectedly", answer.epoch)
                    return await self._give_up(ClusterError(f"recovery to epoch {answer.epoch} failed: {err!r}"))
                report.detect_seconds = waited
                self._done(report)
                return None

    def _newest_placement(self) -> PlacementAnswer:
        """The controller's newest placement if it is newer than the epoch in use, else that epoch."""
        latest, epoch = self.feed.latest, self.cluster.epoch
        if latest is not None and not latest.error and latest.epoch > epoch.number:
            return latest
        return PlacementAnswer(epoch.number, dict(epoch.placement), dict(epoch.addresses),
                               members=frozenset(epoch.plan.workers))

    async def _came_back(self, back: set[str], lost: set[str], restarted: set[str]) -> bool:
        """Probe the lost workers ``back``: those that answer now (restarted under their name,
        or reachable again) move from ``lost`` to ``restarted``. True while some stay lost."""
        found = await probe(self.cluster, back)
        returned = {w for w, held in found.items() if held is not None}
        if returned:
            log.warning("%s answer%s again: rebuilding in place", ", ".join(sorted(returned)),
                        "s" if len(returned) == 1 else "")
        lost -= returned
        restarted |= returned
        return bool(lost)

    async def _rebuild(self, answer: PlacementAnswer, lost: set[str], trigger: str,
                       restarted: set[str] = frozenset()) -> RecoveryReport:
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cluster.channels.connect(answer.addresses)
        old = cluster.epoch
        held = await probe(cluster, (set(old.plan.workers) if old else set()) - lost | answer.workers)
        missing = sorted(w for w in answer.workers if held[w] is None)
        if missing:
            raise ClusterError(f"epoch {answer.epoch} places blocks on {', '.join(missing)}, which cannot be reached")
        reachable = {w: blocks for w, blocks in held.items() if blocks is not None}
        names = list(cluster.sessions)
        await asyncio.gather(*[cluster.sessions.rewire(n, set(reachable)) for n in names])
        unload, load = block_changes(reachable, answer.placement)
        await self._unload(unload)
        weights_bytes = await cluster.weights.ship(load, cluster.stubs, progress=False,
                                                   load_timeout_seconds=self.timeout_seconds)
        await cluster.switch_epoch(answer.epoch, answer.placement, answer.addresses)
        cluster.down = None
        names = await self._evict(names, trigger)
        t1 = loop.time()
        steps, tokens = await self._replay(names)
        cluster.rebuilds += 1
        epoch = cluster.epoch
        return RecoveryReport(answer.epoch, sorted(lost), trigger, restarted=sorted(restarted),
                              sessions=len(names), replayed_steps=steps,
                              replayed_tokens=tokens, weights_bytes=weights_bytes,
                              activation_bytes=tokens * step_bytes_per_token(epoch.plan, cluster.dataflow.label,
                                                                               cluster.shape),
                              ship_seconds=t1 - t0, replay_seconds=loop.time() - t1)

    async def _unload(self, unload: dict[str, list[BlockId]]) -> None:
        async def one(worker: str, blocks: list[BlockId]) -> None:
            try:
                await self.cluster.stubs[worker].UnloadBlocks(
                    worker_pb2.UnloadBlocksRequest(block_ids=[str(b) for b in blocks]), timeout=30)
            except grpc.aio.AioRpcError as err:
                raise ClusterError(f"unloading {len(blocks)} blocks on {worker}: {err.code().name}: "
                                   f"{err.details()}") from None
        await asyncio.gather(*[one(w, b) for w, b in unload.items()])

    async def _evict(self, names: list[str], trigger: str) -> list[str]:
        """End with RESOURCE_EXHAUSTED the sessions whose K/V reservations the new placement
        cannot hold (the newest first; headnode/admission_control.py), rather than overcommit
        the survivors; the rest of ``names``, to replay."""
        cluster = self.cluster
        ended = await cluster.admission.evict(cluster.epoch.placement, f"recovering ({trigger})")
        for name, error in ended.items():
            cluster.failed[name] = error  # its next step raises it (a session not started yet too)
            await cluster.sessions.end(name, cluster.epoch)
        return [n for n in names if n not in ended]

    async def _replay(self, names: list[str]) -> tuple[int, int]:
        """Feed every session's steps again, the sessions side by side; (steps, tokens)."""
        cluster = self.cluster
        epoch = cluster.epoch

        async def one(name: str) -> None:
            session = cluster.sessions.open(name, epoch)
            for chunk in session.history:
                await cluster.run(session, chunk)
        tasks = [asyncio.create_task(one(n)) for n in names]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        sessions = [cluster.sessions.get(n) for n in names]
        return sum(len(s.history) for s in sessions), sum(s.tokens for s in sessions)

    # ------------------------------------------------------------------ outcomes
    def _done(self, report: RecoveryReport) -> None:
        self.reports.append(report)
        del self.reports[:-REPORTS_KEPT]
        log.warning("recovered to epoch %d without %s%s in %.2f s (%.2f probing and waiting for the controller, "
                    "%.2f shipping "
                    "%d bytes of weights, %.2f replaying %d steps, %d tokens, of %d sessions)", report.epoch,
                    ", ".join(report.lost) or "any lost worker",
                    f", {', '.join(report.restarted)} restarted" if report.restarted else "",
                    report.seconds, report.detect_seconds,
                    report.ship_seconds, report.weights_bytes, report.replay_seconds, report.replayed_steps,
                    report.replayed_tokens, report.sessions)
        metrics = self.cluster.metrics
        if metrics is not None:
            metrics.recoveries.labels("ok").inc()
            metrics.recovery_seconds.observe(report.seconds)
            metrics.recovery_bytes.labels("weights").inc(report.weights_bytes)
            metrics.recovery_bytes.labels("activations").inc(report.activation_bytes)
            metrics.recovered_sessions.inc(report.sessions)
            metrics.replayed_tokens.inc(report.replayed_tokens)

    async def _give_up(self, error: ClusterError, down: bool = False) -> ClusterError:
        """End every live session with ``error`` (their next step raises it); with ``down``,
        every new step too, until a placement fits again."""
        cluster = self.cluster
        names = list(cluster.sessions)
        for name in names:  # first, so every one's next step raises even if dropping caches fails
            cluster.failed[name] = error
        for name in names:
            try:
                await cluster.sessions.end(name, cluster.epoch)
            except Exception:
                log.exception("session %s: ending it after a failed recovery failed", name)
        if down:
            cluster.down = error
        self.failures.append(str(error))
        del self.failures[:-REPORTS_KEPT]
        log.error("recovery failed, %d live sessions ended: %s", len(names), error)
        if cluster.metrics is not None:
            cluster.metrics.recoveries.labels("no_capacity" if down else "failed").inc()
        return error
