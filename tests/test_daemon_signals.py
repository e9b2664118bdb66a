"""A daemon stops on SIGTERM even while it is still getting going (no controller yet)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.system


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_worker_waiting_for_its_controller_stops_on_sigterm(tmp_path):
    nobody = f"127.0.0.1:{free_port()}"  # no controller will ever answer here
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "edgeheads.headnode.cli", "worker", "--listen", "127.0.0.1:0",
                             "--controller", nobody, "--name", "lonely", "--threads", "1",
                             "--ready-file", str(tmp_path / "worker.ready")],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        # nothing announces "started serving and now retrying the controller" but its log
        while "retrying" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "retrying" in log.read_text(), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "worker.ready").exists()
    assert "Traceback" not in log.read_text()
