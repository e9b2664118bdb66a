"""Worker telemetry readings that do not need a board: temperature from thermal zones,
the Pi's throttling flags, and compute capacity refined from real block timings."""

from __future__ import annotations

from edgeheads.worker import telemetry


def test_temperature_from_thermal_zones_and_pi_throttling_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry.psutil, "sensors_temperatures", lambda: {}, raising=False)
    for i, millideg in enumerate([41500, 67250]):
        (tmp_path / f"thermal_zone{i}").mkdir()
        (tmp_path / f"thermal_zone{i}" / "temp").write_text(str(millideg))
    assert telemetry.temperature_celsius(tmp_path) == 67.25
    assert telemetry.temperature_celsius(tmp_path / "none") is None
    flags = tmp_path / "get_throttled"
    flags.write_text("0x50000\n")  # throttled in the past (bits 16, 18) but not now
    assert telemetry.throttled(flags) is False
    flags.write_text("0x50004\n")  # bit 2: throttled now
    assert telemetry.throttled(flags) is True
    assert telemetry.throttled(tmp_path / "missing") is None


def test_compute_estimate_moves_toward_measured_block_rates():
    estimate = telemetry.ComputeEstimate(benchmark_flops=10e9, weight=0.5, min_seconds=0.05)
    assert estimate.update(1e6, 0.01) == 10e9  # too little work to say anything
    assert estimate.update(2e9, 1.0) == 6e9  # measured 2 GFLOP/s: halfway there
    assert estimate.update(2e9, 1.0) == 6e9  # no new work, no change
    assert abs(estimate.update(4e9, 2.0) - 4e9) < 1e-3
    cpu, load = telemetry.cpu_readings()
    assert 0 <= cpu <= 100 and load >= 0


def test_memory_limit_is_the_lowest_of_host_cgroup_and_config(monkeypatch):
    host_total = telemetry.psutil.virtual_memory().total
    monkeypatch.setattr(telemetry, "cgroup_memory", lambda: None)
    assert telemetry.memory_limit() == telemetry.MemoryLimit(host_total, "host")
    assert telemetry.memory_limit(host_total + 1) == telemetry.MemoryLimit(host_total, "host")
    monkeypatch.setattr(telemetry, "cgroup_memory", lambda: (1 << 30, 123))
    assert telemetry.memory_limit() == telemetry.MemoryLimit(1 << 30, "cgroup")
    assert telemetry.memory_limit(512 << 20) == telemetry.MemoryLimit(512 << 20, "config")
    assert telemetry.memory_limit(2 << 30) == telemetry.MemoryLimit(1 << 30, "cgroup")
