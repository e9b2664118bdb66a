"""Live migration with real processes: blocks move between workers while tokens are
generated, and not a token changes; a destination that dies mid-migration leaves the
old placement serving with the block still on its source."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import grpc
import psutil
import pytest
import torch

from edgeheads.controller.spread import WorkerCapacity, spread
from edgeheads.headnode import Client
from edgeheads.headnode.cluster import ClusterExecutor
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.engine import BlockEngine
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.migrate import MigrationError, migrate
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import worker_pb2, worker_pb2_grpc
from edgeheads.common.spec import BlockKind
from test_cli_generate import run_cli
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def tiny(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-migration", seed=3)
    return path, load_model(str(path), progress=False)


@pytest.mark.parametrize("dataflow", ["relay", "head"])
def test_forced_migrations_every_few_tokens_do_not_change_a_token(tiny, dataflow):
    path, model = tiny
    prompt = "Blocks on the move"
    expected = LocalGenerator(model).generate(prompt, SamplingParams(max_new_tokens=128)).token_ids
    env = {"EDGEHEADS_CONTROLLER__POLICY": "shuffle", "EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": "6",
           "EDGEHEADS_CONTROLLER__SHUFFLE_MOVES": "3", "EDGEHEADS_HEADNODE__DATAFLOW": dataflow,
           "EDGEHEADS_WORKER__LINK_PROBE_SECONDS": "0.5"}
    with LocalCluster(str(path), workers=3, progress=False, extra_env=env) as cluster, \
            Client(cluster.address) as client:
        first = client.status()
        got = client.generate_full(prompt, max_new_tokens=128)
        status = client.status()
        cli = run_cli("status", "--controller", cluster.addresses["controller"], "--headnode", cluster.address,
                      "--json")
        text = run_cli("status", "--controller", cluster.addresses["controller"])
        scraped = {name: scrape(cluster.metrics[name]) for name in ("headnode", "controller", "worker-0")}
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    assert shown["policy"] == "shuffle" and shown["epoch"] >= status["epoch"]
    replans = [d for d in shown["decisions"] if "tokens since the last plan" in d["reason"]]
    assert replans and all(d["blocks_moved"] >= 1 and d["predicted_token_seconds"] > 0 for d in replans)
    assert shown["headnode"]["migrations"] >= status["migrations"]  # one may finish after the generation
    assert text.returncode == 0 and "because: " in text.stdout and "worker-2" in text.stdout
    # no limits set: each worker's ceiling is the host's memory or the cgroup this test runs in
    assert all(0 < w["memory_limit_bytes"] <= psutil.virtual_memory().total
               and w["memory_limit_source"] in ("host", "cgroup") for w in shown["workers"])
    # relay workers probe the peers they send to; in head dataflow workers have no peers
    links = [link for w in shown["workers"] for link in w["links"].values()]
    assert bool(links) == (dataflow == "relay")
    assert all(link["bandwidth_bytes_per_second"] > 0 and link["latency_seconds"] > 0 for link in links)
    assert ("Mbit/s" in text.stdout) == (dataflow == "relay")
    assert got.token_ids == expected
    head, controller, worker = scraped["headnode"], scraped["controller"], scraped["worker-0"]
    assert head['edgeheads_migrations_total{result="ok"}'] >= 5
    assert head['edgeheads_migrated_bytes_total{stage="pre-copy"}'] > 0
    assert head[f'edgeheads_step_seconds_count{{dataflow="{dataflow}"}}'] >= len(expected)
    assert head[f'edgeheads_phase_seconds_count{{dataflow="{dataflow}"}}'] > len(expected)
    assert head["edgeheads_migration_stall_seconds_count"] >= 5 and head["edgeheads_epoch"] >= status["epoch"]
    assert controller['edgeheads_controller_replans_total{trigger="tokens"}'] >= 5
    assert controller['edgeheads_controller_worker_memory_used_bytes{worker="worker-1"}'] > 0
    assert worker["edgeheads_worker_memory_used_bytes"] > 0 and worker["edgeheads_worker_compute_flops"] > 0
    assert len(expected) > 60  # long enough for many re-plans
    assert status["migration_failures"] == 0, status["last_migration_error"]
    assert status["migrations"] >= 5 and status["epoch"] >= first["epoch"] + 5
    assert status["migrated_bytes"] > 0
    assert status["placement"] != first["placement"]


def scrape(address: str) -> dict[str, float]:
    """A Prometheus endpoint's samples: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def worker_blocks(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return list(worker_pb2_grpc.WorkerStub(channel).GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10).blocks)


def test_destination_dying_mid_migration_keeps_the_old_placement_and_every_token(tiny):
    path, model = tiny
    parts = model.parts
    with LocalCluster(str(path), workers=4, progress=False, with_headnode=False) as cluster:
        addresses = {f"worker-{i}": cluster.addresses[f"worker-{i}"] for i in range(4)}
        placement = spread(parts.shape, [WorkerCapacity(f"worker-{i}", 1 << 40) for i in range(3)], 256)
        moved = next(b for b, w in sorted(placement.items()) if b.kind is BlockKind.ATTENTION and w == "worker-0")
        destination = cluster.procs["worker-3"]
        engine = BlockEngine(parts)
        ids = model.tokenizer("The old placement keeps serving").input_ids

        async def run() -> tuple[list[int], list[int], Exception]:
            executor = ClusterExecutor(parts)
            await executor.apply_placement(1, placement, addresses, progress=False)
            got, want = [], []
            token_in, token_ref = ids, ids
            for _ in range(5):
                token_in = [int(torch.argmax(await executor.step("s", token_in)))]
                token_ref = [int(torch.argmax(engine.forward("s", token_ref)))]
                got += token_in
                want += token_ref
            os.kill(destination.pid, signal.SIGSTOP)  # the pull to worker-3 now hangs mid-migration
            new = {**placement, moved: "worker-3"}
            task = asyncio.create_task(migrate(executor, 2, new, addresses, timeout_seconds=60))
            for i in range(20):  # decoding goes on during the pre-copy
                if i == 5:
                    destination.kill()
                token_in = [int(torch.argmax(await executor.step("s", token_in)))]
                token_ref = [int(torch.argmax(engine.forward("s", token_ref)))]
                got += token_in
                want += token_ref
            try:
                await task
                error = None
            except MigrationError as err:
                error = err
            for _ in range(5):
                token_in = [int(torch.argmax(await executor.step("s", token_in)))]
                token_ref = [int(torch.argmax(engine.forward("s", token_ref)))]
                got += token_in
                want += token_ref
            assert executor.epoch.number == 1 and executor.epoch.placement[moved] == "worker-0"
            await executor.close()
            return got, want, error

        got, want, error = asyncio.run(run())
        assert isinstance(error, MigrationError) and "abandoned" in str(error), error
        assert got == want
        assert str(moved) in worker_blocks(addresses["worker-0"])  # still on the source


def test_status_of_an_unreachable_controller_is_a_clear_error():
    result = run_cli("status", "--controller", "127.0.0.1:9")
    assert result.returncode != 0
    assert "controller 127.0.0.1:9" in result.stderr and "UNAVAILABLE" in result.stderr


@pytest.mark.parametrize("weights_from, switch_cache_bytes", [("headnode", 16 << 20), ("headnode", -1),
                                                              ("source", 16 << 20)])
def test_a_migrations_weights_come_from_the_head_node_or_the_source_as_asked(tiny, weights_from,
                                                                              switch_cache_bytes):
    """headnode.migration_weights: with "headnode" the head node sends the destination the
    weights and the pull from the source brings K/V caches only, whole at the switch when they
    are small, else pre-copied; with "source" the pull brings both. Either way no token changes."""
    path, model = tiny
    parts = model.parts
    with LocalCluster(str(path), workers=3, progress=False, with_headnode=False) as cluster:
        addresses = {f"worker-{i}": cluster.addresses[f"worker-{i}"] for i in range(3)}
        placement = {b: "worker-0" for b in parts.blocks}
        engine = BlockEngine(parts)
        ids = model.tokenizer("Weights come from one place or the other").input_ids

        async def run():
            executor = ClusterExecutor(parts)
            await executor.apply_placement(1, placement, addresses, progress=False)
            got, want, token_in, token_ref = [], [], ids, ids
            for step in range(8):
                if step == 4:
                    new = {b: ("worker-1" if b.layer % 2 else "worker-2") for b in parts.blocks}
                    report = await migrate(executor, 2, new, addresses, timeout_seconds=60, weights_from=weights_from,
                                           switch_cache_bytes=switch_cache_bytes)
                token_in = [int(torch.argmax(await executor.step("s", token_in)))]
                token_ref = [int(torch.argmax(engine.forward("s", token_ref)))]
                got += token_in
                want += token_ref
            assert executor.epoch.number == 2
            weights = sum(executor.weights.digest(b).size_bytes for b in parts.blocks)
            await executor.close()
            return got, want, report, weights

        got, want, report, weights = asyncio.run(run())
    assert got == want
    assert len(report.moves) == len(parts.blocks)
    if weights_from == "headnode":
        assert report.weights_shipped == weights and report.weights_skipped == len(report.moves)
    else:
        assert report.weights_shipped == 0 and report.weights_skipped == 0
    at_switch = weights_from == "headnode" and switch_cache_bytes >= 0
    assert report.caches_at_switch == at_switch
    if at_switch:  # the caches came from the source, whole, at the switch
        assert report.precopy_bytes == weights and report.delta_bytes > 0
    else:  # pre-copied, and only the rows of the steps since at the switch
        assert report.precopy_bytes > weights
