"""CPU quotas per emulated board with cgroup v1 (``cpu`` controller; needs root).

A board with half the compute of one core of this machine gets ``cpu.cfs_quota_us`` = 2,000
per 4,000 µs period; every process put in its group (the worker, and a CPU hog started
"on" that board) shares that quota, as programs on one board share its cores.

The period is short on purpose: with the kernel's default 100 ms, a board that works only a few
milliseconds per token runs them at full speed and waits out the rest of the period only when
its quota is used up, so it is fast or stalled instead of slow. Over a 4 ms period every
block call of more than a few milliseconds runs at about the board's share, as on a slower
board. The quota cannot go below 1 ms, so the period grows for boards under a quarter of a core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel's floor for cpu.cfs_quota_us


def period_and_quota(cores: float) -> tuple[int, int]:
    """(cfs_period_us, cfs_quota_us) for ``cores`` of this machine's cores."""
    period = max(PERIOD_US, int(-(-MIN_QUOTA_US // cores)) if cores < 1 else PERIOD_US)
    period = min(period, 1_000_000)  # the kernel's ceiling
    return period, max(MIN_QUOTA_US, int(cores * period))


class CgroupError(RuntimeError):
    pass


def available() -> bool:
    """Whether cgroup v1's cpu controller is mounted and writable here."""
    return (ROOT / "cgroup.procs").exists() and os.access(ROOT, os.W_OK)


class CpuGroup:
    """One board's CPU group: ``cores`` of this machine's cores at most (0.5 = half a core)."""

    def __init__(self, name: str, cores: float) -> None:
        if cores <= 0:
            raise CgroupError(f"{name}: a CPU quota must be positive, got {cores} cores")
        self.path = ROOT / name
        self.cores = cores
        try:
            self.path.mkdir(exist_ok=True)
            self._write(cores)
        except OSError as err:
            raise CgroupError(f"cannot set up the cgroup {self.path}: {err}") from err

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def set_cores(self, cores: float) -> None:
        self.cores = cores
        self._write(cores)

    def _write(self, cores: float) -> None:
        period, quota = period_and_quota(cores)
        # the quota may not exceed what a shorter period allows: lift it first, then set the period
        (self.path / "cpu.cfs_quota_us").write_text("-1")
        (self.path / "cpu.cfs_period_us").write_text(str(period))
        (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def remove(self) -> None:
        """Move what is left to the root group, then delete the group."""
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (ROOT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass


# a busy loop that ends when the testbed that started it is gone (even a SIGKILLed one)
HOG = """
import os, sys
parent, n = int(sys.argv[1]), 0
while n or os.getppid() == parent:
    n = (n + 1) % 2000000
"""


class CpuHog:
    """Busy loops in a board's CPU group: load another program puts on that board."""

    def __init__(self, group: CpuGroup, processes: int = 1) -> None:
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(processes):
                self.procs.append(subprocess.Popen([sys.executable, "-c", HOG, str(os.getpid())],
                                                   start_new_session=True))
                group.add(self.procs[-1].pid)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
