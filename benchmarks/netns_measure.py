"""What crosses a shaped link between network namespaces, and what the machine's CPUs did
meanwhile: the measurements of benchmarks/migration_netns.py (needs root). Namespace ``X``
is ``eh-X`` with its end of the veth ``eh-X-n``, shaped by tc as that benchmark sets it up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

LONE_FLOW_PORT = 50070  # not the relay port: a lone bulk flow goes in the class the pre-copy uses
LONE_FLOW_BYTES = 12 << 20


def tc_sent(name: str) -> tuple[int, int]:
    """(all bytes, relay frames' bytes) the shaper of namespace ``name`` has sent, by tc's own
    counters: a frame's length on the wire, headers of every segment included (the veth's
    rx_bytes counts a GSO packet's headers once, and reads 4-5% low). Relay bytes are 0 behind
    ``fifo``, which has no class for them."""
    def sent(kind: str) -> dict[str, int]:
        """Sent bytes per qdisc or class, keyed by its first line ("qdisc htb 1: root ...")."""
        out = subprocess.run(["ip", "netns", "exec", f"eh-{name}", "tc", "-s", kind, "show", "dev", f"eh-{name}-n"],
                             capture_output=True, text=True, check=True).stdout
        counts, head = {}, ""
        for line in out.splitlines():
            words = line.split()
            if words[:1] == [kind]:
                head = line
            elif words[:1] == ["Sent"] and head:
                counts[head] = int(words[1])
        return counts
    root = next(v for k, v in sent("qdisc").items() if " root " in k)
    relay = sum(v for k, v in sent("class").items() if k.split()[:3] == ["class", "htb", "1:10"])
    return root, relay


class TcSampler(threading.Thread):
    """tc_sent(name) every ``interval`` seconds while it runs, as (seconds since ``origin``, all, relay)."""

    def __init__(self, name: str, origin: float, interval: float = 0.1):
        super().__init__(daemon=True)
        self.name_, self.origin, self.interval = name, origin, interval
        self.series: list[tuple[float, int, int]] = []
        self.stopped = threading.Event()

    def sample(self) -> None:
        self.series.append((time.perf_counter() - self.origin, *tc_sent(self.name_)))

    def run(self) -> None:
        self.sample()
        while not self.stopped.wait(self.interval):
            self.sample()
        self.sample()


def between(series: list[tuple[float, int, int]], start: float, end: float, column: int) -> float:
    """Bytes counted from ``start`` to ``end`` (seconds), interpolated in a sampled counter."""
    times, counts = [r[0] for r in series], [r[column] for r in series]
    return float(np.interp(end, times, counts) - np.interp(start, times, counts))


LONE_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
got, first, last = 0, None, None
while data := conn.recv(1 << 20):
    now = time.perf_counter()
    first, last, got = first or now, now, got + len(data)
print(got, last - first, flush=True)
"""
LONE_SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as conn:
    conn.sendall(bytes(int(sys.argv[3])))
"""


def cpu_times() -> tuple[float, np.ndarray]:
    """(now, the machine's user, system, idle and steal seconds so far), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, _iowait, irq, softirq, steal = fields
    return time.perf_counter(), np.array([user + nice, system + irq + softirq, idle, steal]) / os.sysconf("SC_CLK_TCK")


def cores_between(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> np.ndarray:
    """What this machine's CPUs did between two cpu_times(), in cores (user, system, idle, steal):
    the hypervisor's steal is time the machine's virtual CPUs wanted and another tenant got."""
    return (b[1] - a[1]) / (b[0] - a[0])


def cores_text(cores: np.ndarray) -> str:
    return ", ".join(f"{name} {v:.2f}" for name, v in zip(("user", "system", "idle", "steal"), cores))


def lone_flow_rate(sender_ns: str, receiver_ns: str, receiver_address: str) -> float:
    """Payload bytes/s of one TCP flow from namespace ``sender_ns`` to ``receiver_address`` in
    ``receiver_ns``, over the shaped link with nothing else on it: what the link carries
    (iperf's figure), the ceiling for a pre-copy."""
    receiver = subprocess.Popen(["ip", "netns", "exec", receiver_ns, sys.executable, "-c", LONE_RECEIVER,
                                 receiver_address, str(LONE_FLOW_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", sender_ns, sys.executable, "-c", LONE_SENDER, receiver_address,
                        str(LONE_FLOW_PORT), str(LONE_FLOW_BYTES)], check=True, timeout=60)
        got, seconds = receiver.stdout.readline().split()
        receiver.wait(10)
    finally:
        receiver.kill()
    # the first recv ends the first packet's time, so one segment is not timed: count it out
    return (int(got) - 1448) / float(seconds)
