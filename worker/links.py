"""What a worker knows about its links to peers: measured passively from block pulls
and actively by probing at a low duty cycle (empty Probes for latency, a 1 MiB one
for bandwidth). Reported with the telemetry.

A reading is the link's, not its ends': a probe to a peer starved of CPU (a busy board, a
cgroup quota spent) waits until that peer runs, and reads tens of milliseconds on a link of a
fraction of one. The controller charges a link's latency to every message that crosses it,
and it learns what a starved worker costs from the worker's own timings and the measured
dataflow (controller/calibration.py); counting the wait again in the latency multiplied it
(a 2.0 s prediction for a 0.57 s token). So each report is the least latency and the highest
bandwidth of the samples of the last ``LINK_WINDOW_SECONDS``, the physical floor and ceiling
that queueing at either end only hides, and a probe spreads its latency samples over more
than one scheduler period (``RTT_SAMPLES`` at ``RTT_SPACING_SECONDS``), so that one of them
finds the peer running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from edgeheads.v1 import controller_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.common.channels import open_channel
from edgeheads.common.config import GrpcSettings

log = logging.getLogger(__name__)

# big enough that a token bucket's burst (tbf's 64 KiB, a switch's buffer) does not inflate the
# estimate much: 256 KiB read 1.3x a 100 Mbit/s link's rate through a 64 KiB burst
PROBE_BYTES = 1024 * 1024
# a report is the best sample this recent (twenty probes at the default period). Longer than
# most hogs: with 120 s, a hog of four minutes on a board left only samples it had delayed, and
# the controller charged 7 ms more to each message of a round-robin token, during the hog and
# for up to a probe period after it. The cost: a link that really got slower (Wi-Fi) is read
# at its old rate for up to this long, while the fitted message cost takes up what it can.
LINK_WINDOW_SECONDS = 600.0
RTT_SAMPLES = 8  # empty probes per measurement of the latency ...
RTT_SPACING_SECONDS = 0.025  # ... this far apart: 175 ms, more than a CFS period (100 ms)


@dataclass
class Link:
    """One peer's samples of the last ``window_seconds`` (time, value) and what they say."""

    window_seconds: float = LINK_WINDOW_SECONDS
    source: str = ""
    measured_at: float = 0.0
    bandwidths: deque = field(default_factory=deque)
    latencies: deque = field(default_factory=deque)

    def add(self, bandwidth: float | None, latency: float | None, source: str, now: float) -> None:
        if bandwidth:
            self.bandwidths.append((now, bandwidth))
        if latency:
            self.latencies.append((now, latency))
        for samples in (self.bandwidths, self.latencies):  # the newest sample of each stays, however old
            while len(samples) > 1 and now - samples[0][0] > self.window_seconds:
                samples.popleft()
        self.source, self.measured_at = source, now

    @property
    def bandwidth_bytes_per_second(self) -> float:
        """The highest bandwidth sampled in the window (0: none yet)."""
        return max((b for _, b in self.bandwidths), default=0.0)

    @property
    def latency_seconds(self) -> float:
        """The least one-way latency sampled in the window (0: none yet)."""
        return min((lat for _, lat in self.latencies), default=0.0)


class LinkTable:
    def __init__(self, window_seconds: float = LINK_WINDOW_SECONDS) -> None:
        self.window_seconds = window_seconds
        self.links: dict[str, Link] = {}

    def record(self, peer: str, bandwidth: float | None, latency: float | None, source: str,
               now: float | None = None) -> None:
        link = self.links.setdefault(peer, Link(self.window_seconds))
        link.add(bandwidth, latency, source, time.time() if now is None else now)

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
        for i in range(RTT_SAMPLES):
            if i:
                await asyncio.sleep(RTT_SPACING_SECONDS)
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
