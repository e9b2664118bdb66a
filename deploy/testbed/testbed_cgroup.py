"""CPU quotas per emulated board with cgroup v1 (``cpu`` controller; needs root).

A board with half the compute of one core of this machine gets ``cpu.cfs_quota_us`` = 50,000
per 100,000 µs period; every process put in its group (the worker, and a CPU hog started
"on" that board) shares that quota, as programs on one board share its cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


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
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(cores * PERIOD_US))))
        except OSError as err:
            raise CgroupError(f"cannot set up the cgroup {self.path}: {err}") from err

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def set_cores(self, cores: float) -> None:
        self.cores = cores
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(cores * PERIOD_US))))

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


class CpuHog:
    """A busy loop in a board's CPU group: load another program puts on that board."""

    def __init__(self, group: CpuGroup) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        group.add(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
