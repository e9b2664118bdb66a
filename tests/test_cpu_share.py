"""The cores a worker can have on its board (worker/cpu_share.py), how a block call is charged
with them (worker/host.py), and how the controller scales an untimed board's benchmark by
its CPU share (controller/calibration.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeheads.controller import calibration as cal
from edgeheads.headnode.slicing import slice_checkpoint
from edgeheads.worker import cpu_share
from edgeheads.worker.cpu_share import CpuShare, available_cores, charge_cores, effective_seconds
from test_executor_fused import host_with, step
from tiny_configs import TINY_CONFIGS


def test_a_call_is_charged_its_cpu_time_over_the_cores_it_can_have_never_less_than_its_wall_time():
    # 1 ms of CPU on an eighth of a core: the quota makes the board wait 7 ms more for it,
    # though the call itself ran at full speed (1.1 ms of wall time)
    assert effective_seconds(0.0011, 0.001, 0.125) == pytest.approx(0.008)
    assert effective_seconds(0.0011, 0.001, 4.0) == pytest.approx(0.0011)  # one thread: one core at most
    assert effective_seconds(0.02, 0.001, 0.5) == pytest.approx(0.02)  # it waited longer than that


def test_calls_are_charged_at_the_quota_as_often_as_the_quota_ran_out():
    assert charge_cores(0.25, 1.0) == pytest.approx(0.25)  # every period throttled: 4 s per CPU second
    assert charge_cores(0.25, 0.0) == pytest.approx(1.0)  # never: the calls cost what they took
    assert charge_cores(0.25, 0.5) == pytest.approx(1 / 2.5)
    assert charge_cores(2.0, 1.0) == pytest.approx(1.0)  # one thread never waits on a 2-core quota


def test_the_throttled_share_is_read_from_the_groups_cpu_stat(tmp_path):
    proc = fake_group(tmp_path, [os.getpid()])
    stat = tmp_path / "board" / "cpu.stat"
    stat.write_text("usage_usec 1\nnr_periods 100\nnr_throttled 10\nthrottled_usec 5\n")
    share = CpuShare(proc, tmp_path)
    assert share.charge == pytest.approx(1.0)  # nothing to compare with yet
    stat.write_text("usage_usec 1\nnr_periods 300\nnr_throttled 110\nthrottled_usec 5\n")
    share.sample()
    assert share.throttled_share == pytest.approx(0.5) and share.charge == pytest.approx(1 / 2.5)
    stat.unlink()  # unreadable: charged as it ran
    share.sample()
    assert share.charge == pytest.approx(1.0)


def test_the_throttled_share_covers_only_the_last_window(tmp_path):
    proc = fake_group(tmp_path, [os.getpid()])
    stat = tmp_path / "board" / "cpu.stat"
    w = cpu_share.THROTTLE_WINDOW_SECONDS

    def read(now, periods, throttled):
        stat.write_text(f"nr_periods {periods}\nnr_throttled {throttled}\n")
        return share.sample_throttle(now * w)

    stat.write_text("nr_periods 0\nnr_throttled 0\n")
    share = CpuShare(proc, tmp_path)
    read(0.0, 100, 0)
    assert read(0.4, 200, 100) == pytest.approx(charge_cores(0.25, 0.5))  # a hog came at 0.2 w
    read(0.8, 300, 100)  # and left at 0.4 w
    read(1.2, 400, 100)
    assert share.throttled_share == pytest.approx(100 / 300)  # the reading at 0 is the base
    # by 1.6 w the hog is more than a window behind: calls cost what they take again
    assert read(1.6, 500, 100) == pytest.approx(1.0) and share.throttled_share == 0.0
    read(4.0, 500, 100)  # the group did not run: nothing was throttled
    assert share.throttled_share == 0.0
    read(4.2, 10, 10)  # counters from another group: a fresh start, no negative share
    assert share.throttled_share == 0.0
    assert read(4.4, 20, 20) == pytest.approx(0.25)


def test_the_daemons_watch_applies_the_charge_as_the_throttling_changes(tmp_path):
    proc = fake_group(tmp_path, [os.getpid()])
    stat = tmp_path / "board" / "cpu.stat"
    stat.write_text("nr_periods 0\nnr_throttled 0\n")
    share = CpuShare(proc, tmp_path)
    applied: list[float] = []

    async def main():
        watch = asyncio.create_task(share.watch_throttle(applied.append, every=0.01))
        await asyncio.sleep(0.03)  # idle: nothing throttled yet
        for periods in range(1, 30):  # every period throttled
            stat.write_text(f"nr_periods {periods}\nnr_throttled {periods}\n")
            await asyncio.sleep(0.01)
        watch.cancel()

    asyncio.run(main())
    assert applied and applied[0] == pytest.approx(1.0) and applied[-1] == pytest.approx(0.25)


def test_the_cores_left_are_the_quota_less_the_others_but_at_least_a_fair_share():
    assert available_cores(0.5, {}) == 0.5
    assert available_cores(0.5, {11: 0.1, 12: 0.0}) == pytest.approx(0.4)
    # three busy loops took all of a half-core quota while the worker idled: when it runs, the
    # kernel gives it a quarter of the quota
    assert available_cores(0.5, {11: 0.5 / 3, 12: 0.5 / 3, 13: 0.5 / 3}) == pytest.approx(0.125)


def test_the_cgroup_and_its_quota_are_found_for_v1_and_v2(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "board").mkdir(parents=True)
    (v1 / "cpu" / "board" / "cpu.cfs_quota_us").write_text("1000\n")
    (v1 / "cpu" / "board" / "cpu.cfs_period_us").write_text("8000\n")
    directory, version = cpu_share._cgroup_dir("2:cpuacct:/\n1:cpu:/board\n0::/\n", v1)
    assert (directory, version) == (v1 / "cpu" / "board", 1)
    assert cpu_share.quota_cores(directory, version) == pytest.approx(0.125)
    (v1 / "cpu" / "board" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_share.quota_cores(directory, version) is None
    v2 = tmp_path / "v2"
    (v2 / "system.slice" / "w.service").mkdir(parents=True)
    directory, version = cpu_share._cgroup_dir("0::/system.slice/w.service\n", v2)
    assert (directory, version) == (v2 / "system.slice" / "w.service", 2)
    (directory / "cpu.max").write_text("50000 100000\n")
    assert cpu_share.quota_cores(directory, version) == pytest.approx(0.5)
    (directory / "cpu.max").write_text("max 100000\n")
    assert cpu_share.quota_cores(directory, version) is None
    assert cpu_share.quota_cores(None, 0) is None
    assert cpu_share.quota_cores(tmp_path / "missing", 2) is None  # unreadable: no quota, no error


def fake_group(tmp_path, pids: list[int]):
    group = tmp_path / "board"
    group.mkdir()
    (group / "cpu.max").write_text("25000 100000\n")  # a quarter of a core
    (group / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    proc = tmp_path / "cgroup"
    proc.write_text("0::/board\n")
    return proc


def test_a_busy_program_in_the_workers_group_leaves_it_a_fair_share(tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        share = CpuShare(fake_group(tmp_path, [os.getpid(), hog.pid]), tmp_path)
        assert share.allowed == pytest.approx(0.25)
        time.sleep(0.4)
        share.sample()  # the loop used far more than the quota (it is not really limited here)
        assert share.cores == pytest.approx(0.125) and share.fraction == pytest.approx(0.5)
    finally:
        hog.kill()
        hog.wait()


def test_an_idle_program_in_the_workers_group_leaves_it_everything(tmp_path):
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # past its start-up
        share = CpuShare(fake_group(tmp_path, [os.getpid(), idle.pid]), tmp_path)
        time.sleep(0.3)
        assert share.sample() == pytest.approx(0.25) and share.fraction == 1.0
    finally:
        idle.kill()
        idle.wait()


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama-gqa"]).eval()
    return slice_checkpoint(model.config, dict(model.state_dict()))


def test_a_worker_with_an_eighth_of_a_core_charges_its_blocks_eight_times_their_cpu_time(parts):
    blocks = ["attn(0,0)", "ffn(0)"]
    hosts = {cores: host_with(parts, f"w{cores}", blocks) for cores in (None, 0.125)}
    hosts[0.125].cores = 0.125
    x = torch.randn(1, 1, parts.shape.hidden_size)
    for host in hosts.values():
        step(host, "s", 0, torch.randn(1, 4, parts.shape.hidden_size), blocks)  # prefill: not timed
        cpu, charged, wall = time.thread_time(), host.charged_seconds, host.compute_seconds
        for position in range(4, 24):
            step(host, "s", position, x, blocks)
        host.cpu_spent, host.decode_charged = time.thread_time() - cpu, host.charged_seconds - charged
        host.decode_wall = host.compute_seconds - wall
    full, eighth = hosts[None], hosts[0.125]
    assert full.decode_charged == pytest.approx(full.decode_wall)  # no quota: the calls cost what they took
    # an eighth of a core: each call's CPU time 8 times over, far more than it took even on a
    # machine busy enough to double a call's wall time (the CPU time does not grow with that)
    assert 3 * eighth.decode_wall < eighth.decode_charged <= 8 * eighth.cpu_spent + 1e-6
    timed = {c: sum(s for _, s in host.kind_work.values()) for c, host in hosts.items()}
    assert timed[0.125] > 3 * eighth.decode_wall  # the kinds' timings carry the charge
    # the FLOPs are the same: only the seconds they cost differ
    assert {k: w[0] for k, w in eighth.kind_work.items()} == {k: w[0] for k, w in full.kind_work.items()}


def test_an_untimed_board_is_priced_at_its_benchmark_times_the_cpu_share_it_has():
    c = cal.Calibration(smoothing_seconds=0.0)
    c.observe_worker("orin", {"ffn": 4e9}, 8e9, now=0.0, available_fraction=1.0)
    c.observe_worker("xavier", {}, 8e9, now=0.0, available_fraction=1.0)
    assert c.view().device_rates["xavier"] == pytest.approx(4e9)
    c.observe_worker("xavier", {}, now=1.0, available_fraction=0.25)  # a program took 3/4 of it
    assert c.view().device_rates["xavier"] == pytest.approx(1e9)
    # a timed board's timings already say how busy it is: its share does not scale them again
    c.observe_worker("orin", {"ffn": 4e9}, now=1.0, available_fraction=0.5)
    assert c.view().device_rates["orin"] == pytest.approx(4e9)
    # smoothed over the calibration's time constant, as its rates are
    s = cal.Calibration(smoothing_seconds=3.0)
    s.observe_worker("orin", {"ffn": 4e9}, 8e9, now=0.0, available_fraction=1.0)
    s.observe_worker("xavier", {}, 8e9, now=0.0, available_fraction=1.0)
    s.observe_worker("xavier", {}, now=3.0, available_fraction=0.0)  # not measured: ignored
    s.observe_worker("xavier", {}, now=3.0, available_fraction=0.25)
    assert s.view().device_rates["xavier"] == pytest.approx(4e9 * (1 - 0.75 * (1 - 1 / 2.718281828459045)))
