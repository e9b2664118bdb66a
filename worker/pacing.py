"""Pacing a bulk stream below a link's rate (pure).

A migration's pre-copy shares the link with decoding's relay frames. Sent as fast as TCP goes,
it fills the bottleneck's queue (a router's buffer, a tbf/htb bucket) and every relay frame
waits behind it: decoding slowed 2.7x at the median during a pre-copy over 100 Mbit/s
(benchmarks/migration_netns.py). Sent in small chunks at a rate a little under the link's,
the queue stays near empty and a relay frame goes straight through.
"""

from __future__ import annotations

PACED_CHUNK_BYTES = 64 * 1024  # small enough that one chunk is a few ms on a 100 Mbit/s link


def delay_seconds(sent_bytes: int, elapsed_seconds: float, rate_bytes_per_second: float) -> float:
    """How long to wait before sending more, so that ``sent_bytes`` after ``elapsed_seconds`` stays
    at ``rate_bytes_per_second`` on average (0 when behind schedule or unpaced)."""
    if rate_bytes_per_second <= 0:
        return 0.0
    return max(0.0, sent_bytes / rate_bytes_per_second - elapsed_seconds)


def paced_rate(fraction: float, measured_bytes_per_second: float | None) -> float:
    """The rate to pace a pre-copy at: ``fraction`` of the measured link bandwidth; 0 (unpaced)
    when the link has not been measured or pacing is off."""
    if fraction <= 0 or not measured_bytes_per_second or measured_bytes_per_second <= 0:
        return 0.0
    return fraction * measured_bytes_per_second


PACED_CHUNK_SECONDS = 0.01  # a paced chunk is this long at the pacing rate, at least PACED_CHUNK_BYTES


def paced_chunk_bytes(rate_bytes_per_second: float, unpaced_bytes: int) -> int:
    """The chunk size of a stream paced to ``rate_bytes_per_second`` (``unpaced_bytes`` when
    unpaced): about PACED_CHUNK_SECONDS of it, so that a chunk never holds a relay frame back
    for long on a slow link, while a fast link is not cut into many small chunks (each chunk
    is a turn of the source's event loop, which a busy board gives out slowly)."""
    if rate_bytes_per_second <= 0:
        return unpaced_bytes
    return int(min(unpaced_bytes, max(PACED_CHUNK_BYTES, rate_bytes_per_second * PACED_CHUNK_SECONDS)))
