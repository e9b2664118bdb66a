"""``edgeheads health HOST:PORT``: exit 0 while a real daemon serves, 1 (quickly, one line) when
nothing listens or the daemon has stopped; it runs from the plain (worker) install."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from test_install_lean_worker import RUN_CLI, blocked_env
from test_systemd_notify import start_controller, stop

pytestmark = pytest.mark.system


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``edgeheads health`` as the plain install has it: the extras' packages cannot be imported."""
    return subprocess.run([sys.executable, "-c", RUN_CLI, "health", *args], capture_output=True, text=True,
                          env=blocked_env(), timeout=timeout)


def test_health_of_a_running_then_stopped_controller(tmp_path):
    controller, address = start_controller(tmp_path)
    try:
        ok = health(address)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == f"{address}: SERVING" and "Traceback" not in ok.stderr
        service = health(address, "--service", "edgeheads.v1.Controller", "--timeout", "10")
        assert service.returncode == 0 and "SERVING" in service.stdout, service.stderr
        unknown = health(address, "--service", "edgeheads.v1.Nothing")
        assert unknown.returncode == 1 and "unknown service" in unknown.stderr, unknown.stderr
    finally:
        stop(controller)
    assert controller.returncode == 0
    gone = health(address, "--timeout", "5")
    assert gone.returncode == 1, gone.stdout
    assert len(gone.stderr.strip().splitlines()) == 1 and "unreachable" in gone.stderr, gone.stderr


def test_health_of_a_closed_port_fails_quickly():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = health(address, "--timeout", "20")
    took = time.monotonic() - started
    assert proc.returncode == 1
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"{address}: unreachable"), line
    assert not proc.stdout
    assert took < 15, took  # refused at once, not waiting out --timeout (the rest is Python start-up)


def test_a_bad_timeout_is_a_usage_error():
    proc = health("127.0.0.1:1", "--timeout", "0", timeout=60)
    assert proc.returncode == 2 and "positive number of seconds" in proc.stderr
