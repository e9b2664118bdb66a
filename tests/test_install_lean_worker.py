"""The plain install (``pip install edgeheads``) is a worker's: nothing on the worker's path
imports what only the extras bring (pyproject.toml), a worker started without them serves a
real cluster token-for-token, and a command that needs an extra names it.

The worker-only install is emulated in a subprocess whose import system refuses the extras'
packages (a meta-path finder, installed before anything else). With
``EDGEHEADS_TEST_LEAN_PYTHON=/path/to/venv/bin/python`` (a venv made by ``pip install
torch==2.13.0 && pip install .``) the cluster test runs its workers in that venv instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

# the top-level packages of `pip install "edgeheads[all]"` that `pip install edgeheads` lacks
# (the extras and what they pull in)
NOT_IN_PLAIN_INSTALL = ("transformers", "tokenizers", "huggingface_hub", "gguf", "accelerate", "tqdm", "rich",
                        "pandas", "scipy", "ortools", "matplotlib", "PIL")

BLOCKER = """
import importlib.abc, os, sys
_BLOCKED = set(os.environ["EDGEHEADS_TEST_BLOCKED"].split(","))
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this install)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""

RUN_CLI = BLOCKER + "from edgeheads.headnode.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def blocked_env(blocked=NOT_IN_PLAIN_INSTALL) -> dict[str, str]:
    return {**os.environ, "EDGEHEADS_TEST_BLOCKED": ",".join(blocked)}


def run_blocked(code: str, *args: str, blocked=NOT_IN_PLAIN_INSTALL, timeout: float = 120):
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True,
                          env=blocked_env(blocked), timeout=timeout)


def test_the_blocker_blocks():
    proc = run_blocked("import transformers")
    assert proc.returncode == 1 and "No module named 'transformers' (not in this install)" in proc.stderr


def test_worker_path_imports_no_extra():
    """Every module of edgeheads.worker, edgeheads.common and edgeheads.v1, the dispatcher and
    the ``worker`` subcommand's parser import without any extra's package."""
    code = """
import importlib, pkgutil
import edgeheads.common, edgeheads.v1, edgeheads.worker
names = []
for package in (edgeheads.v1, edgeheads.common, edgeheads.worker):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
from edgeheads.headnode import cli
args = cli.build_parser().parse_args(["worker", "--listen", "127.0.0.1:0", "--memory-limit", "1GiB"])
assert args.func.__module__ == "edgeheads.worker.cli", args.func.__module__
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in _BLOCKED)
assert not leaked, leaked
print(len(names), "modules")
"""
    proc = run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[0]) > 20  # the walk saw the daemon, blocks, wire, ...
    help_ = subprocess.run([sys.executable, "-c", RUN_CLI, "worker", "--help"], capture_output=True, text=True,
                           env=blocked_env(), timeout=60)
    assert help_.returncode == 0 and "--memory-limit" in help_.stdout, help_.stderr


def test_controller_and_simulate_run_from_the_plain_install(scenario_file, tmp_path):
    sim = subprocess.run([sys.executable, "-c", RUN_CLI, "simulate", str(scenario_file), "--algorithms",
                          "greedy,block-round-robin", "--json"], capture_output=True, text=True, env=blocked_env(),
                         timeout=120)
    assert sim.returncode == 0, sim.stderr
    assert set(yaml.safe_load(sim.stdout)["algorithms"]) == {"greedy", "block-round-robin"}
    ready = tmp_path / "controller.ready"
    env = {**blocked_env(), "EDGEHEADS_CONTROLLER__METRICS_LISTEN": "127.0.0.1:0"}
    controller = subprocess.Popen([sys.executable, "-c", RUN_CLI, "controller", "--listen", "127.0.0.1:0",
                                   "--ready-file", str(ready)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and controller.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), controller.stderr.read() if controller.poll() is not None else "not ready in 60 s"
    finally:
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "small.yaml"
    path.write_text(yaml.safe_dump({
        "name": "small", "seed": 1, "prompt_tokens": 4, "new_tokens": 4, "interval_tokens": 2,
        "model": {"shape": {"arch": "llama", "n_layers": 1, "hidden_size": 32, "n_heads": 2, "n_kv_heads": 2,
                            "head_dim": 16, "intermediate_size": 64, "vocab_size": 100}},
        "devices": {"count": 2, "memory_bytes": {"value": 1.0e7}, "peak_flops_per_second": {"value": 1.0e9}},
        "links": {"bandwidth_bytes_per_second": {"value": 1.0e7}, "latency_seconds": {"value": 0.001}},
    }))
    return path


@pytest.mark.parametrize("blocked,argv,extra", [
    (NOT_IN_PLAIN_INSTALL, ["generate", "hi", "--local"], "headnode"),
    (NOT_IN_PLAIN_INSTALL, ["headnode", "--listen", "127.0.0.1:0"], "headnode"),
    (NOT_IN_PLAIN_INSTALL, ["simulate", "SCENARIO", "--algorithms", "greedy,exact"], "solver"),
    (NOT_IN_PLAIN_INSTALL, ["simulate", "SCENARIO", "--algorithms", "greedy", "--plot", "PLOTS"], "plots"),
], ids=["generate", "headnode", "exact", "plot"])
def test_a_missing_extra_is_named(blocked, argv, extra, scenario_file, tmp_path):
    argv = [str(scenario_file) if a == "SCENARIO" else str(tmp_path / "plots") if a == "PLOTS" else a for a in argv]
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *argv], capture_output=True, text=True,
                          env=blocked_env(blocked), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f'pip install "edgeheads[{extra}]"' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "plots").exists()  # failed before simulating, not after


@pytest.mark.system
def test_lean_workers_serve_a_real_cluster(save_tiny_model):
    """Two workers without any extra host every block of a real generation; the tokens are the
    in-process engine's."""
    from tiny_configs import TINY_CONFIGS

    from edgeheads.common.spec import BlockId
    from edgeheads.headnode import Client
    from edgeheads.headnode.embedded import LocalCluster
    from edgeheads.headnode.loading import load_model
    from edgeheads.headnode.local import LocalGenerator
    from edgeheads.headnode.sampling import SamplingParams

    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-lean-workers", seed=7)
    prompt = "Edge boards"
    expected = LocalGenerator(load_model(str(path), progress=False)).generate(
        prompt, SamplingParams(max_new_tokens=16)).token_ids
    lean_python = os.environ.get("EDGEHEADS_TEST_LEAN_PYTHON")
    worker_command = ([lean_python, "-m", "edgeheads.headnode.cli"] if lean_python
                      else [sys.executable, "-c", RUN_CLI])
    with LocalCluster(str(path), workers=2, progress=False, worker_command=worker_command,
                      extra_env={"EDGEHEADS_TEST_BLOCKED": ",".join(NOT_IN_PLAIN_INSTALL)}) as cluster, \
            Client(cluster.address) as client:
        for name in ("worker-0", "worker-1"):
            assert psutil.Process(cluster.procs[name].pid).cmdline()[:2] == worker_command[:2]
        got = client.generate_full(prompt, max_new_tokens=16)
        status = client.status()
        worker_logs = {name: cluster.log_tail(name, 200) for name in ("worker-0", "worker-1")}
    assert got.token_ids == expected
    hosts = {w for b, w in status["placement"].items() if BlockId.parse(b)}
    assert hosts == {"worker-0", "worker-1"}
    for name, text in worker_logs.items():
        assert "Traceback" not in text, f"{name}:\n{text}"
