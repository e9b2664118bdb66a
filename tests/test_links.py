"""Link readings (worker/links.py): a report is the link's floor latency and ceiling bandwidth over
a recent window, and a probe spreads its latency samples, so that a peer starved of CPU (which
answers late) is not read as a slow link."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from edgeheads.common.config import GrpcSettings
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.worker import links


def test_a_report_is_the_least_latency_and_highest_bandwidth_of_the_window():
    table = links.LinkTable(window_seconds=60.0)
    table.record("peer:1", 1.2e7, 0.0004, "probe", now=0.0)
    table.record("peer:1", 3.0e6, 0.0300, "probe", now=30.0)  # the peer was busy: a late answer
    link = table.links["peer:1"]
    assert link.latency_seconds == pytest.approx(0.0004)
    assert link.bandwidth_bytes_per_second == pytest.approx(1.2e7)
    [report] = table.reports()
    assert report.latency_seconds == pytest.approx(0.0004) and report.bandwidth_bytes_per_second == pytest.approx(1.2e7)
    # a transfer's sample counts in the window too, latency-less
    table.record("peer:1", 2.0e7, None, "transfer", now=40.0)
    assert link.bandwidth_bytes_per_second == pytest.approx(2.0e7) and link.source == "transfer"
    # later than the window, the good samples are gone: what lasted is what the link is now
    table.record("peer:1", 3.5e6, 0.0250, "probe", now=105.0)
    assert link.latency_seconds == pytest.approx(0.0250)
    assert link.bandwidth_bytes_per_second == pytest.approx(3.5e6)
    # however old, the newest sample stays the reading
    table.record("other:1", 5e6, 0.001, "probe", now=0.0)
    table.record("other:1", None, 0.002, "probe", now=1000.0)
    assert table.links["other:1"].bandwidth_bytes_per_second == pytest.approx(5e6)
    assert table.links["other:1"].latency_seconds == pytest.approx(0.002)


def test_a_hog_of_minutes_does_not_wipe_out_the_links_good_readings():
    # probes every 30 s; the peer is starved from 60 s to 330 s (a 4.5-minute hog): each probe in
    # that time answers late. The reading stays the link's own throughout and after.
    table = links.LinkTable()
    for t in range(0, 420, 30):
        starved = 60 <= t < 330
        table.record("peer:1", 3.0e6 if starved else 1.2e7, 0.008 if starved else 0.0004, "probe", now=float(t))
        link = table.links["peer:1"]
        assert link.latency_seconds == pytest.approx(0.0004), t
        assert link.bandwidth_bytes_per_second == pytest.approx(1.2e7), t


class StarvedPeer(worker_pb2_grpc.WorkerServicer):
    """Answers its first ``late`` empty probes after ``delay`` seconds (a board whose CPU is taken
    for a while), then at once."""

    def __init__(self, late: int, delay: float) -> None:
        self.late, self.delay, self.calls = late, delay, 0

    async def Probe(self, request, context):
        self.calls += 1
        if not request.payload and self.calls <= self.late:
            await asyncio.sleep(self.delay)
        return worker_pb2.ProbeReply(received=len(request.payload))


async def probe_starved(late: int, delay: float) -> tuple[float, float, int]:
    peer = StarvedPeer(late, delay)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        latency, bandwidth = await links.probe(f"127.0.0.1:{port}", GrpcSettings())
    finally:
        await server.stop(None)
    return latency, bandwidth, peer.calls


def test_a_probe_of_a_peer_that_answers_late_for_a_while_reads_the_link_not_the_wait():
    # the connection and the next four samples wait 80 ms each (a 3-sample probe read 40 ms one way)
    started = time.perf_counter()
    latency, bandwidth, calls = asyncio.run(probe_starved(late=5, delay=0.08))
    assert calls == 1 + links.RTT_SAMPLES + 1  # connect, the latency samples, the 1 MiB one
    assert latency < 0.01, f"read {latency * 1e3:.1f} ms one way on loopback"
    assert bandwidth > 0
    # the samples are spread (over more than a scheduler period), not back to back
    assert time.perf_counter() - started >= (links.RTT_SAMPLES - 1) * links.RTT_SPACING_SECONDS
