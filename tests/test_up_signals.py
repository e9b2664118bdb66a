"""``edgeheads up`` stops every daemon it started on SIGTERM (``kill``, ``docker stop``,
systemd), SIGINT (Ctrl-C) and SIGHUP, whether the cluster is serving or still starting, and
leaves no process behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def tiny_model(save_tiny_model):
    return save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-up-signals", seed=2)


def start_up(model, err_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeheads.headnode.cli", "up", "--workers", "2",
                             "--model", str(model)], stdout=subprocess.PIPE, stderr=open(err_path, "w"), text=True)


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def cluster_dir(children: list[psutil.Process]) -> str | None:
    """The cluster's own folder (every daemon's --ready-file is in it); None until a daemon
    has one on its command line (a child between fork and exec shows the parent's)."""
    for child in children:
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "--ready-file" in cmdline:
            return cmdline[cmdline.index("--ready-file") + 1].rsplit("/", 1)[0]
    return None


def assert_all_gone(procs: list[psutil.Process], folder: str) -> None:
    """The processes seen before the signal are gone, and so is any other of this cluster's
    (one started after the snapshot)."""
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    late = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if folder in " ".join(p.info["cmdline"] or [])]
    assert not late, f"left behind: {late}"


def serving(proc: subprocess.Popen, err_path) -> tuple[list[psutil.Process], str | None]:
    """Wait until ``edgeheads up`` says its head node serves; then its daemons and their folder."""
    line = proc.stdout.readline()
    assert re.search(r"head node at (\S+),", line), line + err_path.read_text()
    children = descendants(proc)
    return children, cluster_dir(children)


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_up_stops_every_daemon_on_a_signal(tiny_model, tmp_path, sig):
    proc = start_up(tiny_model, tmp_path / "up.err")
    children = []
    try:
        children, folder = serving(proc, tmp_path / "up.err")
        names = [" ".join(c.cmdline()) for c in children]
        for daemon in ("controller", "headnode", "worker"):
            assert any(f"edgeheads.headnode.cli {daemon} " in n for n in names), names
        assert len(children) >= 4  # controller, two workers, head node
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:  # the test failed: clean up by hand
            kill_all([*children, psutil.Process(proc.pid)])
    assert_all_gone(children, folder)
    err = (tmp_path / "up.err").read_text()
    assert "stopping the cluster" in err and "Traceback" not in err, err


def test_up_stops_every_daemon_on_sigterm_while_starting(tiny_model, tmp_path):
    proc = start_up(tiny_model, tmp_path / "up.err")
    children, folder = [], None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the controller is up, workers are being started
            children = descendants(proc)
            folder = cluster_dir(children)
            if len(children) >= 2 and folder:
                break
            time.sleep(0.05)
        assert len(children) >= 2 and folder, (tmp_path / "up.err").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            kill_all([*children, psutil.Process(proc.pid)])
    assert_all_gone(children, folder)
    assert "Traceback" not in (tmp_path / "up.err").read_text()


def test_a_killed_up_takes_its_daemons_with_it(tiny_model, tmp_path):
    """SIGKILL cannot be handled: the daemons ask the kernel to stop them when their launcher dies."""
    proc = start_up(tiny_model, tmp_path / "up.err")
    children = []
    try:
        children, folder = serving(proc, tmp_path / "up.err")
        assert len(children) >= 4
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert_all_gone(children, folder)
    finally:
        kill_all(children)
