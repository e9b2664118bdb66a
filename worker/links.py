"""What a worker knows about its links to peers: measured passively from block pulls
and actively by probing at a low duty cycle (an empty Probe for latency, a 1 MiB one
for bandwidth). Reported with the telemetry."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from edgeheads.v1 import controller_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.common.channels import open_channel
from edgeheads.common.config import GrpcSettings

log = logging.getLogger(__name__)

# big enough that a token bucket's burst (tbf's 64 KiB, a switch's buffer) does not inflate the
# estimate much: 256 KiB read 1.3x a 100 Mbit/s link's rate through a 64 KiB burst
PROBE_BYTES = 1024 * 1024


@dataclass
class Link:
    bandwidth_bytes_per_second: float = 0.0
    latency_seconds: float = 0.0
    source: str = ""
    measured_at: float = 0.0


class LinkTable:
    def __init__(self) -> None:
        self.links: dict[str, Link] = {}

    def record(self, peer: str, bandwidth: float | None, latency: float | None, source: str) -> None:
        link = self.links.setdefault(peer, Link())
        if bandwidth:
            link.bandwidth_bytes_per_second = bandwidth
        if latency:
            link.latency_seconds = latency
        link.source, link.measured_at = source, time.time()

    def reports(self) -> list[controller_pb2.LinkReport]:
        return [controller_pb2.LinkReport(peer=p, bandwidth_bytes_per_second=link.bandwidth_bytes_per_second,
                                          latency_seconds=link.latency_seconds, source=link.source)
                for p, link in sorted(self.links.items())]


async def probe(address: str, grpc_settings: GrpcSettings) -> tuple[float, float]:
    """(one-way latency, bandwidth) to a worker at ``address``."""
    async with open_channel(address, grpc_settings) as channel:  # the process's TLS and token
        stub = worker_pb2_grpc.WorkerStub(channel)
        await stub.Probe(worker_pb2.ProbeRequest(), timeout=10)  # connect
        rtts = []
        for _ in range(3):
            start = time.perf_counter()
            await stub.Probe(worker_pb2.ProbeRequest(), timeout=10)
            rtts.append(time.perf_counter() - start)
        rtt = min(rtts)
        start = time.perf_counter()
        await stub.Probe(worker_pb2.ProbeRequest(payload=bytes(PROBE_BYTES)), timeout=30)
        transfer = max(time.perf_counter() - start - rtt, 1e-6)
    return rtt / 2, PROBE_BYTES / transfer


async def probe_loop(table: LinkTable, peers, grpc_settings: GrpcSettings, period_seconds: float,
                     new_peer_check_seconds: float = 1.0) -> None:
    """Probe each peer in ``peers()`` (a few hundred KiB each) as soon as it appears (checked
    every ``new_peer_check_seconds``: a migration's pre-copy is paced by this measurement, and
    may start seconds after a placement), then again every ``period_seconds``."""
    probed: dict[str, float] = {}  # address -> when it was last probed
    while True:
        await asyncio.sleep(min(period_seconds, new_peer_check_seconds))
        now = time.monotonic()
        for address in sorted(set(peers())):
            if address in probed and now - probed[address] < period_seconds:
                continue
            probed[address] = now
            try:
                latency, bandwidth = await probe(address, grpc_settings)
                table.record(address, bandwidth, latency, "probe")
            except grpc.aio.AioRpcError as err:
                log.info("probing %s: %s", address, err.code().name)
