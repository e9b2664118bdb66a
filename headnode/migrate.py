"""Live migration, driven by the head node: move blocks between workers without
changing a token.

For a new placement, every block whose worker changes is pulled by its destination
straight from its source (weights only if the destination lacks their content hash,
then every session's K/V cache) while decoding goes on: the pre-copy. The blocks one
destination takes from one source travel in a few PullBlocks calls of up to
PULL_BATCH_BLOCKS blocks each, not one call per block: a source serves calls between its
decode steps, and a board left a tenth of a core took 80 s to give up 150 blocks one call
at a time (docs/testbed.md). With
``weights_from="headnode"`` (headnode.migration_weights, the default) the head node first
sends the destinations the weights they lack, as it did when it distributed the model, so the
source only exports K/V caches: a block moving off a board that is busy, which is when the
controller moves blocks, does not wait for that board to serialise its weights (a board left a
fifth of a core took 67 s to export SmolLM2's 74 MB; the testbed, docs/testbed.md). Then, at a
step boundary (the StepGate holds new steps back), each destination pulls only the
cache rows added since, and the head node switches to the new epoch. Only then do
the sources free the blocks. When the weights come from the head node and the live sessions' caches in the moving blocks
are small (at most SWITCH_CACHE_BYTES by their reservations), the caches are not pre-copied:
they move whole at the switch, where the sources are idle. A pre-copy costs a source a turn of
its event loop per chunk, behind a decode step each, so on the testbed's Orin under a hog (1.4 s
steps) the pre-copy of 150 blocks' small caches took 79 s; at the switch it is the few seconds
the delta already took. If anything fails before the switch (a worker dies, a
checksum fails, a timeout passes), the destinations drop their copies and the old
epoch keeps serving. So does a placement that cannot hold the K/V memory the live
sessions reserved (headnode/admission_control.py): checked before the pre-copy, and again
at the switch for the sessions admitted meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import grpc

from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.v1 import worker_pb2
from edgeheads.common.spec import BlockId

log = logging.getLogger(__name__)


PULLS_IN_FLIGHT = 2  # PullBlocks calls per destination at a time
PULL_BATCH_BLOCKS = 32  # blocks per PullBlocks call
SWITCH_CACHE_BYTES = 16 << 20  # caches up to this move at the switch (1.3 s at 100 Mbit/s, 0.13 s at 1 Gbit/s)


class MigrationError(ClusterError):
    """The migration was abandoned; the old epoch is still in use."""


@dataclass(frozen=True)
class Move:
    block: BlockId
    source: str
    destination: str


@dataclass
class MigrationReport:
    epoch: int
    moves: list[Move]
    precopy_bytes: int = 0
    delta_bytes: int = 0
    weights_skipped: int = 0  # moves whose pull brought no weights (the destination held them)
    weights_shipped: int = 0  # bytes of weights the head node sent the destinations itself
    precopy_seconds: float = 0.0
    stall_seconds: float = 0.0  # steps were held back this long (delta pull + switch)
    caches_at_switch: bool = False  # the caches moved whole at the switch (no pre-copy of them)


def moves_between(old: dict[BlockId, str], new: dict[BlockId, str]) -> list[Move]:
    missing = sorted(set(old) ^ set(new))
    if missing:
        raise ValueError(f"the placements cover different blocks, e.g. {missing[0]}")
    return [Move(b, old[b], new[b]) for b in sorted(new) if old[b] != new[b]]


def precopy_caches(weights_from: str, cache_bytes: int, switch_cache_bytes: int = SWITCH_CACHE_BYTES) -> bool:
    """Whether the pre-copy pulls the caches too (and the switch only the rows added since),
    or the caches move whole at the switch: when the weights come from the source, its pull
    brings them anyway; otherwise when they are too big to hold steps back for."""
    return weights_from == "source" or cache_bytes > switch_cache_bytes


def pull_batches(moves: list[Move], batch_blocks: int = PULL_BATCH_BLOCKS) -> list[list[Move]]:
    """The moves as PullBlocks calls: one source and one destination per call, at most
    ``batch_blocks`` blocks each, in the order of ``moves``."""
    if batch_blocks < 1:
        raise ValueError(f"batch_blocks must be at least 1, not {batch_blocks}")
    by_pair: dict[tuple[str, str], list[Move]] = {}
    for move in moves:
        by_pair.setdefault((move.source, move.destination), []).append(move)
    return [pair[i:i + batch_blocks] for pair in by_pair.values() for i in range(0, len(pair), batch_blocks)]


WEIGHTS_FROM = ("headnode", "source")


async def migrate(cluster: ClusterExecutor, number: int, placement: dict[BlockId, str],
                  addresses: dict[str, str], timeout_seconds: float = 120.0,
                  weights_from: str = "headnode", switch_cache_bytes: int = SWITCH_CACHE_BYTES) -> MigrationReport:
    """Move to placement ``number``; raises MigrationError (old epoch kept) on failure.
    Holds the cluster's placement lock throughout: a recovery waits for it to end."""
    if weights_from not in WEIGHTS_FROM:
        raise ValueError(f"weights_from must be one of {WEIGHTS_FROM}, not {weights_from!r}")
    async with cluster.placement_lock:
        return await _migrate(cluster, number, placement, addresses, timeout_seconds, weights_from,
                              switch_cache_bytes)


async def _migrate(cluster: ClusterExecutor, number: int, placement: dict[BlockId, str],
                   addresses: dict[str, str], timeout_seconds: float, weights_from: str,
                   switch_cache_bytes: int) -> MigrationReport:
    old = cluster.epoch
    if old is None:
        raise MigrationError("no placement is in use yet")
    if number <= old.number:
        raise MigrationError(f"epoch {number} is not newer than {old.number}")
    moves = moves_between(old.placement, placement)
    report = MigrationReport(number, moves)
    shape_json = json.dumps(cluster.shape.to_dict())
    all_addresses = {**old.addresses, **addresses}

    async def pull(batch: list[Move], delta: bool) -> list[worker_pb2.PullBlockReply]:
        first = batch[0]
        stub = cluster.stub(first.destination, all_addresses[first.destination])
        request = worker_pb2.PullBlocksRequest(
            source_address=old.addresses[first.source], model_shape_json=shape_json, delta=delta,
            timeout_seconds=timeout_seconds,  # for each block
            blocks=[worker_pb2.PullItem(block_id=str(m.block), content_hash=cluster.weights.content_hash(m.block))
                    for m in batch])
        try:
            reply = await stub.PullBlocks(request, timeout=timeout_seconds * len(batch) + 5)
        except grpc.aio.AioRpcError as err:
            raise MigrationError(f"{len(batch)} blocks {first.source} -> {first.destination} ({first.block}, ...): "
                                 f"{err.code().name}: {err.details()}") from None
        return list(reply.blocks)

    async def pull_all(delta: bool) -> list[worker_pb2.PullBlockReply]:
        # destinations in parallel; per destination two calls in flight, so the link stays
        # busy while the source serializes the next batch
        limits = {d: asyncio.Semaphore(PULLS_IN_FLIGHT) for d in {m.destination for m in moves}}

        async def limited(batch: list[Move]) -> list[worker_pb2.PullBlockReply]:
            async with limits[batch[0].destination]:
                return await pull(batch, delta)
        tasks = [asyncio.ensure_future(limited(b)) for b in pull_batches(moves)]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException:
            # no pull may go on (or start) after the caller unloads the destinations' copies
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [r for batch in replies for r in batch]

    refused = await cluster.admission.placement_refusal(placement)
    if refused is not None:
        raise MigrationError(f"migration to epoch {number} abandoned, epoch {old.number} stays: {refused}")
    try:
        start = time.perf_counter()
        shipped = 0
        if weights_from == "headnode":  # bound there now; the pull then brings the caches only
            stubs = {m.destination: cluster.stub(m.destination, all_addresses[m.destination]) for m in moves}
            shipped = await cluster.weights.ship({m.block: m.destination for m in moves}, stubs, progress=False,
                                                 load_timeout_seconds=timeout_seconds)
        caches_first = precopy_caches(weights_from, cluster.admission.cache_bytes(m.block for m in moves),
                                      switch_cache_bytes)
        report.caches_at_switch = not caches_first
        pre = await pull_all(delta=False) if caches_first else []
        report.precopy_seconds = time.perf_counter() - start
        report.precopy_bytes = shipped + sum(r.bytes for r in pre)
        report.weights_shipped = shipped
        report.weights_skipped = sum(not r.weights_sent for r in pre) if caches_first else len(moves)
        async with cluster.gate.switch():
            held = time.perf_counter()
            try:
                refused = await cluster.admission.placement_refusal(placement, refresh=False)
                if refused is not None:  # sessions admitted during the pre-copy
                    raise ClusterError(refused)
                delta = await pull_all(delta=True)
                await cluster.switch_epoch(number, placement, all_addresses)
            finally:
                report.stall_seconds = time.perf_counter() - held
        report.delta_bytes = sum(r.bytes for r in delta)
    except (ClusterError, asyncio.TimeoutError) as err:
        await _unload(cluster, [(m.destination, m.block) for m in moves])
        raise MigrationError(f"migration to epoch {number} abandoned, epoch {old.number} stays: {err}") from None
    await _unload(cluster, [(m.source, m.block) for m in moves])
    log.info("epoch %d: moved %d blocks (%d bytes pre-copied in %.1f s, %d at the switch%s, steps held %.1f ms)",
             number, len(moves), report.precopy_bytes, report.precopy_seconds, report.delta_bytes,
             " with every cache" if report.caches_at_switch else "", report.stall_seconds * 1e3)
    return report


async def _unload(cluster: ClusterExecutor, items: list[tuple[str, BlockId]]) -> None:
    """Best effort: a worker that is gone has nothing to free."""
    by_worker: dict[str, list[str]] = {}
    for worker, block in items:
        by_worker.setdefault(worker, []).append(str(block))

    async def one(worker: str, blocks: list[str]) -> None:
        try:
            await cluster.stubs[worker].UnloadBlocks(worker_pb2.UnloadBlocksRequest(block_ids=blocks), timeout=10)
        except (grpc.aio.AioRpcError, KeyError) as err:
            log.warning("could not unload %s on %s: %s", blocks, worker, err)
    await asyncio.gather(*[one(w, b) for w, b in by_worker.items()])
