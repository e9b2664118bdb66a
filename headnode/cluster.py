"""The head node's side of the distributed runtime: ship blocks to workers, then run
each forward step as the phases of a StagePlan over per-session worker streams."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from tqdm import tqdm

from edgeheads.headnode.cluster_errors import ClusterError
from edgeheads.headnode.head import HeadStage
from edgeheads.headnode.relay_driver import RelayDriver
from edgeheads.headnode.relay_plan import RelayPlan, relay_plan
from edgeheads.headnode.step_gate import StepGate
from edgeheads.headnode.slicing import ModelParts
from edgeheads.headnode.stage_plan import StagePlan, compile_plan
from edgeheads.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.common.spec import BlockId
from edgeheads.common.config import GrpcSettings
from edgeheads.headnode.metrics import HeadnodeMetrics
from edgeheads.common.wire import chunks, sha256_hex, tensor_from_proto, tensor_to_proto, weights_to_blob

log = logging.getLogger(__name__)


@dataclass
class Epoch:
    number: int
    placement: dict[BlockId, str]  # block -> worker name
    addresses: dict[str, str]  # worker name -> host:port
    plan: StagePlan


@dataclass
class SessionStreams:
    epoch: int
    calls: dict[str, grpc.aio.StreamStreamCall] = field(default_factory=dict)
    position: int = 0


class ClusterExecutor:
    def __init__(self, parts: ModelParts, grpc_settings: GrpcSettings | None = None, dataflow: str = "relay",
                 step_timeout_seconds: float = 60.0, metrics: HeadnodeMetrics | None = None,
                 relay_transport: str = "tcp") -> None:
        self.metrics = metrics
        if dataflow not in ("relay", "head"):
            raise ValueError(f"dataflow must be 'relay' or 'head', not {dataflow!r}")
        self.dataflow = dataflow
        self.relay_transport = relay_transport
        self.dataflow_name = f"relay/{relay_transport}" if dataflow == "relay" else dataflow
        self.step_timeout_seconds = step_timeout_seconds
        self.relay: RelayDriver | None = None
        self._reopening = asyncio.Lock()
        self.gate = StepGate()
        self.on_step: Callable[[int, float, int], None] | None = None  # (tokens, seconds, epoch) after a step
        self.parts = parts
        self.shape = parts.shape
        self.head = HeadStage(parts.shape, parts.head)
        self.grpc_settings = grpc_settings or GrpcSettings()
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self.epoch: Epoch | None = None
        self.sessions: dict[str, SessionStreams] = {}
        self.blobs: dict[BlockId, tuple[str, bytes]] = {}
        self.phase_seconds_total = 0.0
        self.phase_compute_seconds_total = 0.0  # the slowest worker's compute, per phase
        self.phases_run = 0
        self._ops: dict[int, dict[int, list[worker_pb2.StageOp]]] = {}  # epoch -> call -> ops, built once

    # ------------------------------------------------------------------ connections
    def stub(self, worker: str, address: str) -> worker_pb2_grpc.WorkerStub:
        if worker not in self.stubs:
            self.channels[worker] = grpc.aio.insecure_channel(address, options=self.grpc_settings.channel_options())
            self.stubs[worker] = worker_pb2_grpc.WorkerStub(self.channels[worker])
        return self.stubs[worker]

    async def close(self) -> None:
        for session in list(self.sessions):
            await self.end_session(session)
        if self.relay is not None:
            await self.relay.close()
        for channel in self.channels.values():
            await channel.close()

    def blob(self, block: BlockId) -> tuple[str, bytes]:
        """(content hash, safetensors blob) of a block's weights, computed once."""
        if block not in self.blobs:
            data = weights_to_blob(self.parts.blocks[block])
            self.blobs[block] = (sha256_hex(data), data)
        return self.blobs[block]

    # ------------------------------------------------------------------ weights
    async def apply_placement(self, number: int, placement: dict[BlockId, str], addresses: dict[str, str],
                              progress: bool = True) -> None:
        """Ship every block its worker lacks (content-addressed), then switch to the epoch."""
        shape_json = json.dumps(self.shape.to_dict())
        by_worker: dict[str, list[BlockId]] = {}
        for block, worker in sorted(placement.items()):
            by_worker.setdefault(worker, []).append(block)
        todo: list[tuple[str, BlockId, bool]] = []
        for worker, blocks in by_worker.items():
            stub = self.stub(worker, addresses[worker])
            hashes = [self.blob(b)[0] for b in blocks]
            present = set((await stub.HasWeights(worker_pb2.HasWeightsRequest(content_hashes=hashes))).present)
            todo += [(worker, b, self.blob(b)[0] in present) for b in blocks]
        total = sum(len(self.blob(b)[1]) for _, b, have in todo if not have)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="distributing weights", disable=not progress,
                   file=sys.stderr)

        async def load(worker: str, block: BlockId, have: bool) -> None:
            content_hash, data = self.blob(block)

            async def messages():
                head = dict(block_id=str(block), model_shape_json=shape_json, content_hash=content_hash)
                if have:
                    yield worker_pb2.LoadBlockChunk(**head)
                    return
                for i, chunk in enumerate(chunks(data, self.grpc_settings.chunk_bytes)):
                    yield worker_pb2.LoadBlockChunk(**head, chunk=chunk) if i == 0 else \
                        worker_pb2.LoadBlockChunk(chunk=chunk)
                    bar.update(len(chunk.data))
            try:
                await self.stubs[worker].LoadBlock(messages())
            except grpc.aio.AioRpcError as err:
                raise ClusterError(f"loading {block} on {worker}: {err.code().name}: {err.details()}") from None

        try:
            # workers in parallel, each worker's blocks one after another
            await asyncio.gather(*[self._load_all(load, [t for t in todo if t[0] == w]) for w in by_worker])
        finally:
            bar.close()
        await self.switch_epoch(number, placement, addresses)

    async def switch_epoch(self, number: int, placement: dict[BlockId, str], addresses: dict[str, str]) -> None:
        """Start using a placement whose blocks are all in place. Nothing changes if this
        fails (a worker refused the program or is gone). Call it between steps: migrations
        hold ``self.gate`` exclusively around it."""
        for worker, address in addresses.items():
            self.stub(worker, address)
        epoch = Epoch(number, dict(placement), dict(addresses), compile_plan(self.shape, placement))
        driver = None
        if self.dataflow == "relay":
            driver = self._relay_driver(number, relay_plan(epoch.plan))
            try:
                await driver.start(addresses)
            except BaseException:
                await driver.close()
                raise
        self._ops[number] = {id(call): [worker_pb2.StageOp(block_id=str(op.block), inputs=list(op.inputs),
                                                           output=op.output) for op in call.ops]
                             for phase in epoch.plan.phases for call in phase.calls}
        old_epoch, self.epoch = self.epoch, epoch
        if self.metrics is not None:
            self.metrics.epoch.set(number)
        old_driver, self.relay = self.relay, driver
        if old_driver is not None:
            await old_driver.close()
        if old_epoch is not None:
            self._ops.pop(old_epoch.number, None)
        log.info("epoch %d (%s dataflow): %d blocks on %d workers, %d phases per token (%d messages)", number,
                 self.dataflow, len(placement), len(set(placement.values())), len(epoch.plan.phases),
                 epoch.plan.messages())

    @staticmethod
    async def _load_all(load, items) -> None:
        for worker, block, have in items:
            await load(worker, block, have)

    # ------------------------------------------------------------------ sessions and steps
    async def _open(self, session: str) -> SessionStreams:
        assert self.epoch is not None, "apply_placement first"
        streams = SessionStreams(self.epoch.number)
        for worker in self.epoch.plan.workers:
            streams.calls[worker] = self.stubs[worker].RunStage()
        self.sessions[session] = streams
        return streams

    async def end_session(self, session: str) -> None:
        """Drop a session's caches everywhere. Gated like a step: a migration's switch never
        sees a session vanish between measuring and pulling its cache rows."""
        async with self.gate.step():
            await self._drop_session(session)

    async def _drop_session(self, session: str) -> None:
        streams = self.sessions.pop(session, None)
        if streams is None or self.epoch is None:
            return
        for call in streams.calls.values():
            try:
                await call.done_writing()
            except grpc.aio.AioRpcError:
                pass

        async def drop(worker: str) -> None:
            try:
                await self.stubs[worker].DropSession(worker_pb2.DropSessionRequest(session=session), timeout=10)
            except grpc.aio.AioRpcError as err:
                log.warning("session %s: could not drop caches on %s: %s", session, worker, err.code().name)
        await asyncio.gather(*[drop(w) for w in self.epoch.plan.workers])

    async def step(self, session: str, token_ids: list[int]) -> torch.Tensor:
        """Feed new tokens for ``session`` through every phase; logits of the last token (V,).

        Every step runs under one epoch: an epoch switch waits for steps in flight."""
        async with self.gate.step():
            start = time.perf_counter()
            if self.relay is not None:
                logits = await self._relay_step(session, token_ids)
            else:
                logits = await self._head_step(session, token_ids)
            elapsed = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.step.labels(self.dataflow).observe(elapsed)
                self.metrics.tokens.inc(len(token_ids))
            if self.on_step is not None and self.epoch is not None:
                self.on_step(len(token_ids), elapsed, self.epoch.number)
            return logits

    async def _head_step(self, session: str, token_ids: list[int]) -> torch.Tensor:
        streams = self.sessions.get(session) or await self._open(session)
        epoch = self.epoch
        assert epoch is not None
        if streams.epoch != epoch.number:  # the placement changed since this session's last step
            for call in streams.calls.values():
                await call.done_writing()
            streams.calls = {w: self.stubs[w].RunStage() for w in epoch.plan.workers}
            streams.epoch = epoch.number
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        # values stay in wire form between phases: the head node only forwards them
        values: dict[str, tensor_pb2.Tensor] = {"x0": tensor_to_proto(self.head.embed(ids, streams.position))}
        loop = asyncio.get_running_loop()
        for phase in epoch.plan.phases:
            t0 = loop.time()
            calls = phase.calls
            await asyncio.gather(*[streams.calls[call.worker].write(worker_pb2.StageRequest(
                session=session, epoch=epoch.number, position=streams.position,
                inputs=[tensor_pb2.NamedTensor(name=n, tensor=values[n]) for n in call.inputs],
                ops=self._ops[epoch.number][id(call)], return_values=call.returns)) for call in calls])
            slowest = 0.0
            for call in calls:
                stream = streams.calls[call.worker]
                try:
                    reply = await stream.read()
                except grpc.aio.AioRpcError:
                    reply = grpc.aio.EOF
                if reply is grpc.aio.EOF:
                    self.sessions.pop(session, None)
                    raise ClusterError(f"worker {call.worker} ended session {session}: "
                                       f"{(await stream.code()).name}: {await stream.details()}")
                for out in reply.outputs:
                    values[out.name] = out.tensor
                slowest = max(slowest, reply.compute_seconds)
            self.phase_seconds_total += loop.time() - t0
            self.phase_compute_seconds_total += slowest
            self.phases_run += 1
            if self.metrics is not None:
                self.metrics.phase.labels("head").observe(loop.time() - t0)
        final = tensor_from_proto(values[epoch.plan.final], epoch.plan.final)
        streams.position += len(token_ids)
        return self.head.logits(final)

    def _relay_driver(self, number: int, plan: RelayPlan) -> RelayDriver:
        return RelayDriver(number, plan, self.stubs, self.step_timeout_seconds, self.relay_transport,
                           self.grpc_settings.max_message_bytes)

    async def _reopen_relay(self) -> None:
        """A drive of this epoch broke (its steps in flight failed): install the epoch's
        programs again over fresh drives. If that fails too, this step fails and the next
        one tries again, until the controller publishes a new epoch."""
        async with self._reopening:
            old = self.relay
            if old is None or not old.broken or self.epoch is None:
                return
            log.warning("epoch %d: reopening the relay drives (%s)", old.epoch, old.broken)
            driver = self._relay_driver(old.epoch, old.plan)
            try:
                await driver.start(self.epoch.addresses)
            except BaseException:
                await driver.close()
                raise
            self.relay = driver
            await old.close()

    async def _relay_step(self, session: str, token_ids: list[int]) -> torch.Tensor:
        assert self.epoch is not None and self.relay is not None
        if self.relay.broken:
            await self._reopen_relay()
        streams = self.sessions.get(session)
        if streams is None:  # relay sessions keep no streams; the entry holds the position
            streams = self.sessions[session] = SessionStreams(self.epoch.number)
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        x0 = tensor_to_proto(self.head.embed(ids, streams.position))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            final, path_compute = await self.relay.step(session, streams.position, x0)
        except ClusterError:
            await self._drop_session(session)  # already inside the gate
            raise
        elapsed = loop.time() - t0
        phases = self.relay.plan.phases
        self.phase_seconds_total += elapsed
        self.phase_compute_seconds_total += path_compute
        self.phases_run += phases
        if self.metrics is not None:
            for _ in range(phases):
                self.metrics.phase.labels("relay").observe(elapsed / phases)
            self.metrics.step_compute.observe(path_compute)
            self.metrics.step_network.observe(max(0.0, elapsed - path_compute))
        streams.position += len(token_ids)
        return self.head.logits(tensor_from_proto(final, self.epoch.plan.final))
