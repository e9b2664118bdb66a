"""The CLI's distributed paths as a user runs them: the embedded default, --cluster,
`edgeheads up`, and daemon flags/config errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import POLICY_ENV
from edgeheads.headnode import Client
from test_cli_generate import run_cli

pytestmark = pytest.mark.system


def test_generate_without_flags_runs_an_embedded_cluster_and_matches_local(smollm2_gguf, monkeypatch):
    """The README's command, with the controller's default policy (conftest pins spread elsewhere)."""
    monkeypatch.delenv(POLICY_ENV, raising=False)
    args = ("generate", "What is the capital of France?", "--max-new-tokens", "12", "--json")
    cluster = run_cli(*args, timeout=600)
    assert cluster.returncode == 0, cluster.stderr
    assert "starting a local cluster" in cluster.stderr and "distributing weights" in cluster.stderr
    placed = re.search(r"placement by the (\S+) policy, blocks per worker: (.*)", cluster.stderr)
    assert placed and placed.group(1) == "resource-aware", cluster.stderr[-2000:]
    held = dict(share.rsplit(" ", 1) for share in placed.group(2).split(", "))
    assert sorted(held) == ["worker-0", "worker-1", "worker-2"]
    # every block of SmolLM2 (30 layers: 3 KV groups, a projection and an FFN each) is somewhere
    assert sum(int(n) for n in held.values()) == 30 * 5
    local = run_cli(*args, "--local", timeout=600)
    assert json.loads(cluster.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    assert "Paris" in json.loads(cluster.stdout)["text"]
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and "edgeheads.headnode.cli" in p.info["cmdline"]
                 and "--ready-file" in p.info["cmdline"]]
    assert not leftovers, "the embedded cluster left processes behind"


def test_up_serves_until_interrupted_and_generate_cluster_uses_it(smollm2_gguf, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "edgeheads.headnode.cli", "up", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "up.err", "w"), text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"head node at (\S+),", line)
        assert match, line + (tmp_path / "up.err").read_text()
        address = match.group(1)
        streamed = run_cli("generate", "Say hello.", "--cluster", address, "--max-new-tokens", "8")
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout.strip()
        with Client(address) as client:
            assert len(client.status()["workers"]) == 2
        bad = run_cli("generate", "x", "--cluster", address, "--model", "smollm2-135m")
        assert bad.returncode == 2 and "running cluster serves its own model" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert "Traceback" not in (tmp_path / "up.err").read_text()


def test_unreachable_cluster_is_a_clear_error():
    proc = run_cli("generate", "x", "--cluster", "127.0.0.1:9", "--max-new-tokens", "2")
    assert proc.returncode == 1
    assert "edgeheads: error: head node 127.0.0.1:9: UNAVAILABLE" in proc.stderr


def test_bad_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker:\n  memory_limit_bytes: lots\n")
    proc = run_cli("worker", "--config", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.startswith("edgeheads: error:") and "worker.memory_limit_bytes" in proc.stderr
    proc = run_cli("controller", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1 and "missing.yaml" in proc.stderr
    proc = run_cli("worker", "--memory-limit", "2XB")
    assert proc.returncode == 2 and "--memory-limit" in proc.stderr


def test_env_overrides_config_for_a_daemon(tmp_path):
    """EDGEHEADS_* beats the YAML file: a controller told by env to use an unknown policy fails."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("controller:\n  policy: spread\n")
    env = {**os.environ, "EDGEHEADS_CONTROLLER__POLICY": "no-such-policy"}
    proc = subprocess.run([sys.executable, "-m", "edgeheads.headnode.cli", "controller", "--config", str(cfg),
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "unknown placement policy 'no-such-policy'" in proc.stderr
