"""A local cluster on loopback: a controller, N workers and a head node, each its own
process. Used by ``edgeheads generate`` (without --cluster), ``edgeheads up`` and tests."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, model: str | None = None, workers: int = 3, host: str = "127.0.0.1",
                 progress: bool = True, worker_memory_limit_bytes: int | None = None,
                 startup_timeout_seconds: float = 600, extra_env: dict[str, str] | None = None,
                 with_headnode: bool = True) -> None:
        self.with_headnode = with_headnode
        self.model = model
        self.n_workers = workers
        self.host = host
        self.progress = progress
        self.worker_memory_limit_bytes = worker_memory_limit_bytes
        self.startup_timeout_seconds = startup_timeout_seconds
        self.env = {**os.environ, **(extra_env or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="edgeheads-cluster-"))
        self.procs: dict[str, subprocess.Popen] = {}
        # workers on one machine share its cores: one thread each unless there are cores to spare
        # (measured here: 2 threads per worker on 2 shared cores is 1.4x slower per phase)
        cores = len(os.sched_getaffinity(0))
        self.worker_threads = int(os.environ.get("EDGEHEADS_LOCAL_WORKER_THREADS", max(1, cores // max(1, workers))))
        # several processes share these cores: OpenMP threads must sleep, not spin, between ops
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.addresses: dict[str, str] = {}
        self.metrics: dict[str, str] = {}  # daemon -> HOST:PORT of its Prometheus endpoint
        # several daemons on one machine: each picks a free metrics port
        for section in ("CONTROLLER", "WORKER", "HEADNODE"):
            self.env.setdefault(f"EDGEHEADS_{section}__METRICS_LISTEN", f"{host}:0")

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str], show_stderr: bool = False) -> None:
        log_file = open(self.dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "edgeheads.headnode.cli", *args, "--ready-file", str(self.dir / f"{name}.ready")],
            stdout=log_file, stderr=None if show_stderr else subprocess.STDOUT, env=self.env,
            start_new_session=True)

    def _wait_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_seconds
        pending = list(names)
        while pending:
            for name in list(pending):
                ready = self.dir / f"{name}.ready"
                if ready.exists():
                    self.addresses[name] = ready.read_text().strip()
                    metrics = self.dir / f"{name}.ready.metrics"
                    if metrics.exists():
                        self.metrics[name] = metrics.read_text().strip()
                    pending.remove(name)
                elif self.procs[name].poll() is not None:
                    raise LaunchError(f"{name} exited with status {self.procs[name].returncode} while starting:\n"
                                      + self.log_tail(name))
            if time.monotonic() > deadline:
                raise LaunchError(f"{', '.join(pending)} not ready after {self.startup_timeout_seconds:.0f} s")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def start(self) -> str:
        """Start everything; returns the head node's address."""
        try:
            self._spawn("controller", ["controller", "--listen", f"{self.host}:0"])
            self._wait_ready(["controller"])
            controller = self.addresses["controller"]
            names = [f"worker-{i}" for i in range(self.n_workers)]
            for name in names:
                args = ["worker", "--listen", f"{self.host}:0", "--controller", controller, "--name", name]
                args += ["--threads", str(self.worker_threads)]
                if self.worker_memory_limit_bytes:
                    args += ["--memory-limit", str(self.worker_memory_limit_bytes)]
                self._spawn(name, args)
            self._wait_ready(names)
            if not self.with_headnode:  # a caller drives the workers itself (tests)
                return ""
            args = ["headnode", "--listen", f"{self.host}:0", "--controller", controller,
                    "--min-workers", str(self.n_workers)]
            if self.model:
                args += ["--model", self.model]
            if not self.progress:
                args.append("--quiet")
            self._spawn("headnode", args, show_stderr=self.progress)
            self._wait_ready(["headnode"])
        except BaseException:
            self.stop()
            raise
        return self.addresses["headnode"]

    @property
    def address(self) -> str:
        return self.addresses["headnode"]

    def stop(self, timeout_seconds: float = 10) -> None:
        """SIGTERM everything (head node first), then SIGKILL what is left."""
        for name in sorted(self.procs, key=lambda n: (n != "headnode", n == "controller")):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_seconds
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
