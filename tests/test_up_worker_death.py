"""``edgeheads up`` outlives one of its workers: it reports the worker's exit, the head node
recovers onto the others and keeps serving, and SIGTERM still stops everything."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from edgeheads.headnode import Client
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from test_up_signals import assert_all_gone, cluster_dir, descendants, kill_all
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

PROMPT = "Still serving"


def test_up_reports_a_dead_worker_and_keeps_serving(save_tiny_model, tmp_path):
    model = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-up-worker-death", seed=2)
    expected = LocalGenerator(load_model(str(model), progress=False)).generate(
        PROMPT, SamplingParams(max_new_tokens=24)).token_ids
    err_path = tmp_path / "up.err"
    proc = subprocess.Popen([sys.executable, "-m", "edgeheads.headnode.cli", "up", "--workers", "3", "--model",
                             str(model)], stdout=subprocess.PIPE, stderr=open(err_path, "w"), text=True)
    children, folder = [], None
    try:
        line = proc.stdout.readline()
        serving = re.search(r"head node at (\S+),", line)
        assert serving, line + err_path.read_text()
        children = descendants(proc)
        folder = cluster_dir(children)
        victim = next(c for c in children if "worker-1" in c.cmdline())
        victim.kill()
        deadline = time.monotonic() + 30
        while "worker-1 exited" not in err_path.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, err_path.read_text()
            time.sleep(0.1)
        with Client(serving.group(1)) as client:
            got = client.generate_full(PROMPT, max_new_tokens=24).token_ids
            workers = client.status()["workers"]
        assert proc.poll() is None, err_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:  # the test failed: clean up by hand
            kill_all([*children, psutil.Process(proc.pid)])
    assert_all_gone(children, folder)
    err = err_path.read_text()
    assert "edgeheads: worker-1 exited (signal SIGKILL); the cluster goes on with 2 workers" in err, err
    assert "stopping the cluster" in err and "Traceback" not in err, err
    assert got == expected
    assert sorted(workers) == ["worker-0", "worker-2"]
