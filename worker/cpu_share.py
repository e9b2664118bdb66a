"""How much CPU the worker can get on its board, and what a block call really costs there.

A board's compute is shared: with other programs on it, and, in a container or systemd unit
with a CPU quota (``docker run --cpus``, the testbed's cgroups), with the quota's period. The
kernel enforces a quota per period (4-100 ms): a process runs at the machine's full speed until
its quota for the period is used, then waits for the next period. A block call shorter than
the quota therefore times as fast as on an unlimited machine, and the wait lands wherever the
quota ran out, often outside any timed call. On the testbed a Pi 4 given an eighth of a core
timed its blocks at 10 GFLOP/s, faster than the Orin with half a core, while its tokens took
ten times longer; the controller moved blocks onto it and decoding slowed 4-10x.

So a block call is charged ``max(wall, cpu / cores)``: the CPU time the calling thread spent on
it, stretched as the quota stretched it, and never less than it took (``effective_seconds``).
A CPU second in a period that ran out of quota costs ``period / quota`` seconds, one in a period
that did not costs one; the group's ``cpu.stat`` counts both kinds of period, so ``cores`` is
``1 / (1 + (1/quota - 1) x throttled share)`` over the last quarter second (``charge_cores``).
Charging at the quota alone took every board for saturated: on the testbed it put predictions
16-30% above the measured token times, on every policy. ``cores`` is at most one: a decode call
runs on one thread here (a multi-threaded kernel's wall time is below its CPU time, and the
wall time wins). Other programs on the board are not charged here: they run between the
worker's instructions, so their share shows in the wall time of its calls. Charging at the cores left after them, read
once a second, was wrong whenever the load changed within that second: under load that
flipped every few tokens the Orin's idle calls were charged as if loaded, and predictions
came out 2-3x high.

The throttled share is read every ``THROTTLE_WATCH_SECONDS`` (``watch_throttle``, a loop of the
daemon's) over the last ``THROTTLE_WINDOW_SECONDS``. Read only at each report, it charged the
second after a CPU hog stopped as if the hog still ran; with the averaging the workers' rates
had as well (worker/telemetry.py, ``KindRates``), the controller's predictions stayed 15-35%
above the measured token times for seconds after a hog stopped.

``CpuShare`` reads, at every telemetry report, the cores a worker is allowed (its cgroup's
quota, v1 or v2, else the machine's cores) and the cores it can have now: those less what the
other processes of its group (or, without a quota, of the machine) used since the last
reading, but never below a fair share among the ones that were busy (the kernel shares a
quota between runnable processes). ``fraction`` is the second over the first: the controller
scales the start-up benchmark of a board that has not run blocks yet by it, so a busy board is
not taken for an idle one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
BUSY_CORES = 0.05
"""Another process that used this many cores or more since the last reading is busy."""
THROTTLE_WINDOW_SECONDS = 0.25
"""Block calls are charged at the throttled share of the group's periods over this long."""
THROTTLE_WATCH_SECONDS = 0.05
"""How often ``watch_throttle`` reads the group's cpu.stat."""


def effective_seconds(wall: float, cpu: float, cores: float) -> float:
    """What a call cost the board: its CPU time over the cores the worker can have (at most
    one), or its wall time if that is longer."""
    return max(wall, cpu / min(1.0, max(cores, 1e-3)))


def charge_cores(allowed: float, throttled_share: float) -> float:
    """The cores a call's CPU time is spread over: with a quota of ``allowed`` cores (at most
    one counts) and ``throttled_share`` of the group's periods ending throttled, a CPU second
    costs ``1 + (1/allowed - 1) x throttled_share`` seconds: a period that ran out of quota
    waits out the rest, one that did not costs nothing more."""
    allowed = min(1.0, max(allowed, 1e-3))
    share = min(1.0, max(throttled_share, 0.0))
    return 1.0 / (1.0 + (1.0 / allowed - 1.0) * share)


def throttle_counts(directory: Path | None) -> tuple[int, int] | None:
    """(periods the group ran in, periods it was throttled in) from its cpu.stat (v1 and v2)."""
    if directory is None:
        return None
    try:
        fields = dict(line.split()[:2] for line in (directory / "cpu.stat").read_text().splitlines() if line.strip())
        return int(fields["nr_periods"]), int(fields["nr_throttled"])
    except (OSError, KeyError, ValueError):
        return None


def available_cores(allowed: float, others: dict[int, float]) -> float:
    """Cores the worker can have: ``allowed`` less what ``others`` (pid -> cores used) took, but
    at least a fair share of ``allowed`` among itself and the busy ones."""
    busy = sum(1 for used in others.values() if used >= BUSY_CORES)
    return max(allowed - sum(others.values()), allowed / (1 + busy))


def _cgroup_dir(proc_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[Path | None, int]:
    """(the worker's cpu cgroup directory, cgroup version) from /proc/self/cgroup's text."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (root / mount).is_dir():
                    return root / mount / path.lstrip("/"), 1
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/"), 2
    return None, 0


def quota_cores(directory: Path | None, version: int) -> float | None:
    """The group's CPU quota in cores, None when it has none (or it cannot be read)."""
    try:
        if version == 1:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        elif version == 2:
            text = (directory / "cpu.max").read_text().split()
            if text[0] == "max":
                return None
            quota, period = int(text[0]), int(text[1])
        else:
            return None
    except (OSError, ValueError, IndexError, TypeError):
        return None
    return quota / period if quota > 0 and period > 0 else None


class CpuShare:
    """The cores this worker can have, read afresh at every ``sample`` (every telemetry report)."""

    def __init__(self, proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> None:
        self.pid = os.getpid()
        self.proc_cgroup, self.root = proc_cgroup, root
        self.directory, self.version = None, 0
        self.allowed = float(os.cpu_count() or 1)
        self.cores = self.allowed
        self._cpu: dict[int, float] = {}
        self._machine: tuple[float, float] | None = None
        self._at = time.monotonic()
        self.throttled_share = 0.0
        self._throttle: deque[tuple[float, int, int]] = deque()  # (monotonic time, periods, throttled)
        self._lock = threading.Lock()
        self.sample()

    @property
    def limited(self) -> bool:
        """Whether a quota below the machine's cores binds the worker."""
        return self.allowed < (os.cpu_count() or 1)

    @property
    def fraction(self) -> float:
        """The cores it can have over the cores it is allowed (1: nobody else is busy)."""
        return min(1.0, self.cores / self.allowed) if self.allowed > 0 else 1.0

    def sample(self) -> float:
        """Read the quota and the others' CPU use since the last call; returns ``cores``."""
        now = time.monotonic()
        elapsed, self._at = now - self._at, now
        try:  # read again every time: a process can be moved to another group (the testbed does so)
            self.directory, self.version = _cgroup_dir(self.proc_cgroup.read_text(), self.root)
        except OSError:
            self.directory, self.version = None, 0
        self.allowed = quota_cores(self.directory, self.version) or float(os.cpu_count() or 1)
        others = self._group_use(elapsed) if self.directory is not None and self.limited else self._machine_use(elapsed)
        if others is not None:
            self.cores = available_cores(self.allowed, others)
        self.sample_throttle(now)
        return self.cores

    def sample_throttle(self, now: float | None = None) -> float:
        """Read the group's cpu.stat; ``throttled_share`` becomes the share of its periods that
        ended throttled over the last THROTTLE_WINDOW_SECONDS (0 without a quota or cpu.stat).
        Returns ``charge``."""
        now = time.monotonic() if now is None else now
        directory = self.directory
        counts = throttle_counts(directory) if directory is not None and self.limited else None
        with self._lock:
            if counts is None:
                self._throttle.clear()
                self.throttled_share = 0.0
                return self.charge
            if self._throttle and counts[0] < self._throttle[-1][1]:
                self._throttle.clear()  # another group, or its counters were reset
            self._throttle.append((now, *counts))
            # the newest reading at or before the window's start is the base; older ones go
            while len(self._throttle) > 1 and self._throttle[1][0] <= now - THROTTLE_WINDOW_SECONDS:
                self._throttle.popleft()
            _, periods, throttled = self._throttle[0]
            if counts[0] > periods:
                self.throttled_share = (counts[1] - throttled) / (counts[0] - periods)
            elif len(self._throttle) > 1 and self._throttle[0][0] <= now - THROTTLE_WINDOW_SECONDS:
                self.throttled_share = 0.0  # the group has not run for a whole window
            return self.charge

    async def watch_throttle(self, apply, every: float = THROTTLE_WATCH_SECONDS) -> None:
        """Every ``every`` seconds, read the throttled share and ``apply(charge)`` (the daemon sets
        the host's cores with it); runs until cancelled."""
        while True:
            apply(self.sample_throttle())
            await asyncio.sleep(every)

    @property
    def charge(self) -> float:
        """The cores to charge block calls at until the next sample (``charge_cores``)."""
        return charge_cores(self.allowed, self.throttled_share)  # 1 without a quota: the wall time

    def _group_use(self, elapsed: float) -> dict[int, float] | None:
        try:
            pids = [int(p) for p in (self.directory / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return None
        used: dict[int, float] = {}
        seen: dict[int, float] = {}
        for pid in pids:
            if pid == self.pid:
                continue
            try:
                process = psutil.Process(pid)
                times = process.cpu_times()
                # started (or joined the group) since the last reading: its use over its life
                span = elapsed if pid in self._cpu else min(elapsed, time.time() - process.create_time())
            except (psutil.Error, OSError):
                continue
            seen[pid] = times.user + times.system
            used[pid] = max(0.0, seen[pid] - self._cpu.get(pid, 0.0)) / max(span, 1e-3)
        self._cpu = seen
        return used

    def _machine_use(self, elapsed: float) -> dict[int, float] | None:
        busy = psutil.cpu_times()
        total = busy.user + busy.system + getattr(busy, "nice", 0.0)
        own = psutil.Process(self.pid).cpu_times()
        previous, self._machine = self._machine, (total, own.user + own.system)
        if previous is None or elapsed <= 0:
            return None
        others = max(0.0, (total - previous[0]) - (self._machine[1] - previous[1])) / elapsed
        return {0: others}
