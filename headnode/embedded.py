"""A local cluster on loopback: a controller, N workers and a head node, each its own
process. Used by ``edgeheads generate`` (without --cluster), ``edgeheads up`` and tests."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_with_parent(parent_pid: int):
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the thread that started it dies,
    so that even a SIGKILLed launcher leaves no daemon behind (elsewhere: nothing)."""
    def arm() -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died before the request took hold
            os._exit(1)
    return arm


class LaunchError(RuntimeError):
    pass


def exit_description(returncode: int) -> str:
    """How a process ended, from its return code: "status 1", or "signal SIGKILL"."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"status {returncode}"


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGHUP) arrived; a BaseException like KeyboardInterrupt, so that
    only the code that asked for it catches it."""


_deferring = 0  # > 0 while starting a process: a stop signal then waits until it has started
_deferred: list[int] = []


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(f"{signal.Signals(signum).name} received")


@contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """A stop signal arriving within is raised at its end: an exception inside Popen, between
    the fork and the return, would lose the started process."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _deferred:
        signum = _deferred[0]
        _deferred.clear()
        _raise_for(signum)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within: the first SIGTERM or SIGHUP raises Stopped, the first SIGINT KeyboardInterrupt,
    in the main thread (once a daemon being started has started); later ones are ignored, so
    the stop they started runs to its end.

    The daemons run in sessions of their own (a terminal's Ctrl-C reaches only this process)
    and Python's default SIGTERM exits without cleanup; without this, ``kill``, ``docker stop``
    (this process as PID 1 ignores SIGTERM unless it handles it) and systemd leave them running."""
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:
            log.info("%s while stopping: ignored, the stop goes on", signal.Signals(signum).name)
            return
        fired = True
        if _deferring:
            _deferred.append(signum)
            return
        _raise_for(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _deferred.clear()


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Stop signals ignored (main thread only; elsewhere signals never run Python code)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class LocalCluster:
    def __init__(self, model: str | None = None, workers: int = 3, host: str = "127.0.0.1",
                 progress: bool = True, worker_memory_limit_bytes: int | None = None,
                 startup_timeout_seconds: float = 600, extra_env: dict[str, str] | None = None,
                 with_headnode: bool = True, worker_command: list[str] | None = None,
                 dtype: str | None = None) -> None:
        self.with_headnode = with_headnode
        self.dtype = dtype
        # how a worker process runs the CLI; tests run workers as a worker-only install would
        self.cli_command = [sys.executable, "-m", "edgeheads.headnode.cli"]
        self.worker_command = worker_command or self.cli_command
        self.model = model
        self.n_workers = workers
        self.host = host
        self.progress = progress
        self.worker_memory_limit_bytes = worker_memory_limit_bytes
        self.startup_timeout_seconds = startup_timeout_seconds
        self.env = {**os.environ, **(extra_env or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="edgeheads-cluster-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.args: dict[str, list[str]] = {}  # daemon -> the arguments it was started with
        # workers on one machine share its cores: one thread each unless there are cores to spare
        # (measured here: 2 threads per worker on 2 shared cores is 1.4x slower per phase)
        cores = len(os.sched_getaffinity(0))
        self.worker_threads = int(os.environ.get("EDGEHEADS_LOCAL_WORKER_THREADS", max(1, cores // max(1, workers))))
        # several processes share these cores: OpenMP threads must sleep, not spin, between ops
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.addresses: dict[str, str] = {}
        self.metrics: dict[str, str] = {}  # daemon -> HOST:PORT of its Prometheus endpoint
        self.http_address: str | None = None  # HOST:PORT of the head node's OpenAI-compatible API
        self.reported_exits: set[str] = set()  # daemons whose exit new_exits already returned
        # several daemons on one machine: each picks a free metrics port
        for section in ("CONTROLLER", "WORKER", "HEADNODE"):
            self.env.setdefault(f"EDGEHEADS_{section}__METRICS_LISTEN", f"{host}:0")
        self.env.setdefault("EDGEHEADS_HEADNODE__HTTP_LISTEN", f"{host}:0")

    # ------------------------------------------------------------------ processes
    def _command(self, name: str, args: list[str]) -> list[str]:
        """The program that runs daemon ``name`` (a subclass may wrap it, e.g. in a namespace)."""
        return self.worker_command if args[0] == "worker" else self.cli_command

    def _spawn(self, name: str, args: list[str], show_stderr: bool = False, append: bool = False,
               tie_to_parent: bool = True) -> None:
        command = self._command(name, args)
        self.args[name] = list(args)
        with open(self.dir / f"{name}.log", "ab" if append else "wb") as log_file, _stop_signals_deferred():
            self.procs[name] = subprocess.Popen(
                [*command, *args, "--ready-file", str(self.dir / f"{name}.ready")],
                stdout=log_file, stderr=None if show_stderr else subprocess.STDOUT, env=self.env,
                start_new_session=True, preexec_fn=_stop_with_parent(os.getpid()) if tie_to_parent else None)

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
                    http = self.dir / f"{name}.ready.http"
                    if name == "headnode" and http.exists():
                        self.http_address = http.read_text().strip()
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
                self._spawn(name, self._worker_args(name))
            self._wait_ready(names)
            if not self.with_headnode:  # a caller drives the workers itself (tests)
                return ""
            args = ["headnode", "--listen", f"{self.host}:0", "--controller", controller,
                    "--min-workers", str(self.n_workers)]
            if self.model:
                args += ["--model", self.model]
            if self.dtype:
                args += ["--dtype", self.dtype]
            if not self.progress:
                args.append("--quiet")
            self._spawn("headnode", args, show_stderr=self.progress)
            self._wait_ready(["headnode"])
        except BaseException:
            self.stop()
            raise
        return self.addresses["headnode"]

    def _worker_args(self, name: str, memory_limit_bytes: int | None = None) -> list[str]:
        args = ["worker", "--listen", f"{self.host}:0", "--controller", self.addresses["controller"], "--name", name,
                "--threads", str(self.worker_threads)]
        limit = memory_limit_bytes or self.worker_memory_limit_bytes
        if limit:
            args += ["--memory-limit", str(limit)]
        return args

    def add_worker(self, memory_limit_bytes: int | None = None) -> str:
        """Start one more worker (named after the last one) and wait until it has registered;
        its name. ``memory_limit_bytes`` overrides the cluster's per-worker limit."""
        taken = {int(n.rsplit("-", 1)[1]) for n in self.procs if n.startswith("worker-")}
        name = f"worker-{max(taken, default=-1) + 1}"
        self._spawn(name, self._worker_args(name, memory_limit_bytes))
        self._wait_ready([name])
        return name

    def restart(self, name: str, same_address: bool = True, wait: bool = True) -> str | None:
        """Start daemon ``name`` again once it has exited (a test killed it), with the arguments it
        had: on the address it had, or with ``same_address`` False on a free port (a controller
        always on its own: the others dial it). With ``wait``, waits until it is ready and
        returns its address (a worker is ready once registered: without a controller, pass
        False). Its log goes on in the same file.

        It is not tied to this process's death (``_stop_with_parent``), only stopped by ``stop``:
        a preexec function makes Python fork, which runs gRPC's fork handlers in the child, and
        with gRPC calls in flight in this process (a test's streams) they can hang the child
        before it starts; without one the child is started by vfork, which runs none."""
        old = self.procs[name]
        try:
            old.wait(timeout=10)  # a signal just sent takes a moment
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{name} is still running") from None
        self._kill_group(old)
        args = list(self.args[name])
        if same_address or name == "controller":
            args[args.index("--listen") + 1] = self.addresses[name]
        for suffix in ("", ".metrics", ".http"):
            (self.dir / f"{name}.ready{suffix}").unlink(missing_ok=True)
        self.reported_exits.discard(name)
        self._spawn(name, args, show_stderr=name == "headnode" and self.progress, append=True, tie_to_parent=False)
        if not wait:
            return None
        self._wait_ready([name])
        return self.addresses[name]

    def restart_headnode(self, dtype: str | None = None, model: str | None = None,
                         timeout_seconds: float = 10) -> str:
        """Stop the head node (SIGTERM; SIGKILL after ``timeout_seconds``) and start a new one on
        a free port, the controller and workers left running: it announces its model, and the
        controller places it again. With ``dtype`` or ``model``, the new one loads that format
        (``--dtype``) or model (``--model``) instead. Waits until it is ready; its address."""
        proc = self.procs["headnode"]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                log.warning("headnode did not stop within %.0f s of SIGTERM; killing it", timeout_seconds)
                proc.kill()  # restart reaps it and kills its group
        args = self.args["headnode"]
        for flag, value in (("--dtype", dtype), ("--model", model)):
            if value is None:
                continue
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        self.dtype = dtype or self.dtype
        self.model = model or self.model
        self.restart("headnode", same_address=False)
        return self.address

    def new_exits(self) -> dict[str, int]:
        """Daemons that exited since the last call: name -> return code."""
        gone = {n: p.returncode for n, p in self.procs.items() if n not in self.reported_exits and p.poll() is not None}
        self.reported_exits.update(gone)
        return gone

    @property
    def address(self) -> str:
        return self.addresses["headnode"]

    def stop(self, timeout_seconds: float = 10) -> None:
        """SIGTERM every daemon (head node first), wait up to ``timeout_seconds`` for them to
        stop gracefully, then SIGKILL what is left, with anything it started (each daemon leads
        its own process group). Stop signals are ignored meanwhile; safe to call twice."""
        with _signals_ignored():
            try:
                for name in sorted(self.procs, key=lambda n: (n != "headnode", n == "controller")):
                    proc = self.procs[name]
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + timeout_seconds
                for name, proc in self.procs.items():
                    try:
                        proc.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        log.warning("%s did not stop within %.0f s of SIGTERM; killing it", name, timeout_seconds)
            finally:
                for name in list(self.procs):
                    self._kill_group(self.procs.pop(name))

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        """SIGKILL the process group ``proc`` leads (it and what it started), then reap it.
        Called once per process, just after it was reaped or found alive: while any member
        lives, Linux does not hand its group id to another process."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: everything in it has exited
        proc.wait()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
