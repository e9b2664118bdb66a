"""Memory control: a worker reports its cgroup's limit, not the host's memory; lowering
a worker's limit at runtime makes the controller move blocks off it, while a
generation in flight keeps every token."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from edgeheads.headnode import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from edgeheads.worker import telemetry
from tiny_configs import TINY_CONFIGS

GiB = 1 << 30


def test_cgroup_readings_from_v1_and_v2_layouts(tmp_path):
    v1 = tmp_path / "v1"
    group = v1 / "memory" / "pod" / "worker"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(1 << 62))  # "unlimited" here ...
    (group / "memory.stat").write_text(f"cache 0\nhierarchical_memory_limit {3 * GiB}\n")  # ... but not above
    (group / "memory.usage_in_bytes").write_text(str(GiB))
    proc = tmp_path / "cgroup1"
    proc.write_text("4:memory:/pod/worker\n0::/\n")
    assert telemetry.own_cgroups(str(proc)) == ("/", "/pod/worker")
    assert telemetry.cgroup_memory(v1, str(proc)) == (3 * GiB, GiB)

    v2 = tmp_path / "v2"
    leaf = v2 / "a" / "b"
    leaf.mkdir(parents=True)
    (v2 / "a" / "memory.max").write_text(str(2 * GiB))
    (leaf / "memory.max").write_text("max")
    (leaf / "memory.current").write_text(str(GiB // 2))
    proc.write_text("0::/a/b\n")
    assert telemetry.cgroup_memory(v2, str(proc)) == (2 * GiB, GiB // 2)  # the parent's limit applies
    proc.write_text("0::/\n")
    assert telemetry.cgroup_memory(v2, str(proc)) is None


def _memory_cgroup_root() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if os.geteuid() == 0 and (root / "cgroup.procs").exists():
        return root
    return None


@pytest.mark.system
def test_a_worker_in_a_memory_cgroup_reports_that_limit(tmp_path, require_capability):
    root = _memory_cgroup_root()
    require_capability("root and the cgroup v1 memory controller", root is not None)
    group = root / f"edgeheads-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    limit = 1536 * (1 << 20)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    worker = None
    try:
        with LocalCluster(workers=0, progress=False, with_headnode=False) as cluster:
            controller = cluster.addresses["controller"]
            # the shell joins the cgroup, then becomes the worker: the worker never runs outside it
            worker = subprocess.Popen(
                ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', sys.executable, "-m",
                 "edgeheads.headnode.cli", "worker", "--listen", "127.0.0.1:0", "--controller", controller,
                 "--name", "boxed", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with grpc.insecure_channel(controller) as channel:
                stub = controller_pb2_grpc.ControllerStub(channel)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    workers = stub.ListWorkers(controller_pb2.ListWorkersRequest(), timeout=10).workers
                    if workers:
                        break
                    assert worker.poll() is None, "the worker exited"
                    time.sleep(0.2)
                else:
                    pytest.fail("the worker never registered")
                # nothing announces a telemetry report to an outside client: poll until one holds the limit
                while time.monotonic() < deadline:
                    reported = stub.ListWorkers(controller_pb2.ListWorkersRequest(), timeout=10).workers[0]
                    if 0 < reported.memory_available_bytes <= limit:
                        break
                    time.sleep(0.2)
        assert 0 < reported.memory_available_bytes <= limit
        assert (reported.memory_limit_bytes, reported.memory_limit_source) == (limit, "cgroup")
        assert psutil.virtual_memory().available > 2 * limit  # the host's figure would be far larger
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        deadline = time.monotonic() + 10  # the kernel empties the group shortly after the exit
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        group.rmdir()


@pytest.mark.system
def test_lowering_a_workers_memory_limit_moves_blocks_off_it(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-memory-limit", seed=6)
    model = load_model(str(path), progress=False)
    prompt = "Memory is tight on this board"
    expected = LocalGenerator(model).generate(prompt, SamplingParams(max_new_tokens=200)).token_ids
    env = {"EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "0"}  # only the violation may trigger a re-plan
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster, \
            Client(cluster.address) as client:
        before = client.status()
        on_worker = [b for b, w in before["placement"].items() if w == "worker-1"]
        result = {}
        generating = threading.Event()
        thread = threading.Thread(target=lambda: result.update(tokens=client.generate_full(
            prompt, max_new_tokens=200, on_text=lambda _: generating.set()).token_ids))
        thread.start()
        # lowered once the generation's caches exist: a worker over its budget allocates no new ones (and the
        # head node admits no new session there)
        assert generating.wait(60), "the generation did not start"
        with grpc.insecure_channel(cluster.addresses["worker-1"]) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            used = stub.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10).memory_used_bytes
            lowered = time.monotonic()
            stub.SetMemoryLimit(worker_pb2.SetMemoryLimitRequest(memory_limit_bytes=used // 2), timeout=10)
            while time.monotonic() - lowered < 60:
                status = client.status()
                if status["epoch"] > before["epoch"]:
                    break
                time.sleep(0.1)
            moved_after = time.monotonic() - lowered
            thread.join(timeout=300)
            after = stub.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10)
    remaining = [b for b, w in status["placement"].items() if w == "worker-1"]
    assert status["epoch"] > before["epoch"], "no new placement after the limit was lowered"
    assert status["migrations"] >= 1 and status["migration_failures"] == 0, status["last_migration_error"]
    assert len(remaining) < len(on_worker)
    assert after.memory_used_bytes <= used // 2
    assert result["tokens"] == expected
    print(f"blocks moved off worker-1 {moved_after:.1f} s after its limit was lowered")
