"""Testbed profiles: ``edgeheads simulate`` scenarios that the testbed can also run.

A profile is a scenario file (controller/scenario.py: model, tokens, explicit devices, links,
background) whose optional ``testbed`` mapping the simulator leaves alone:

    background:
      events:   # scripted load: simulated, and run as a busy loop in the device's CPU group
        - {device: jetson, start_token: 64, end_token: 320, compute_fraction: 0.5}
    testbed:
      max_cores: 1.0     # the fastest device's CPU quota, in this machine's cores
      relay_priority: true  # relay frames go before bulk traffic on each link (false: one FIFO)
      standby: [{name: nano, memory_bytes: 2.0e9, peak_flops_per_second: 4.0e9}]  # join by event
      links: [{source: nano, destination: pi4, bandwidth_bytes_per_second: 6.25e6, latency_seconds: 0}]
      events:            # what only the testbed does (the simulator has no membership events)
        - {at_token: 160, kind: memory_limit, device: pi5, memory_bytes: 3.0e7}  # SetMemoryLimit
        - {at_token: 224, kind: join, device: nano}     # a standby device's worker starts
        - {at_token: 384, kind: leave, device: pi4}     # its worker is stopped (SIGTERM)

A background event with a compute fraction becomes a ``cpu_hog`` at its start token and a
``cpu_hog_stop`` at its end token: busy loops sharing the device's quota with its worker, as
many as leave the worker about the rest of the device under the kernel's fair share (one for
0.5, three for 0.75: ``hog_processes``). One with a
memory fraction lowers the worker's memory limit by that fraction for its tokens. The random
background jobs (start_probability_per_token) are not run on the testbed.

How the scenario's numbers become the emulation:
- compute: device i gets cores_i = max_cores x flops_i / max(flops), a cgroup CPU quota;
- memory: its worker's ``--memory-limit`` is memory_bytes;
- links: the bandwidth matrix ``materialize`` draws for the simulator (pairs as listed, the rest
  from links.bandwidth_bytes_per_second), one htb class per directed pair; latency is not
  emulated (no netem here). The head node's links are unshaped, as the simulator ignores
  head-node messages when ``headnode_device`` is null (a profile naming one shapes them as
  that device's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeheads.controller.scenario import DeviceSpec, LinkSpec, Scenario, ScenarioError, materialize, parse_scenario

EventKind = Literal["cpu_hog", "cpu_hog_stop", "memory_limit", "join", "leave"]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at_token: int = Field(ge=0)
    kind: EventKind
    device: str
    memory_bytes: float | None = Field(default=None, gt=0)
    processes: int = Field(default=1, ge=1, le=32)  # a cpu_hog's busy loops


class TestbedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_cores: float = Field(default=1.0, gt=0)
    relay_priority: bool = True  # relay frames before bulk traffic on every shaped link (testbed_net.py)
    standby: list[DeviceSpec] = []
    links: list[LinkSpec] = []  # pairs with a standby device (the simulator does not know those devices)
    events: list[Event] = []


@dataclass(frozen=True)
class Profile:
    scenario: Scenario
    events: list[Event]
    testbed: TestbedSpec
    rates: dict[tuple[str, str], float]  # (source, destination) -> bytes/s, workers and "headnode"
    cores: dict[str, float]  # device -> CPU quota in cores
    memory: dict[str, int]  # device -> --memory-limit bytes

    @property
    def devices(self) -> list[str]:
        """The devices that start with the run (standby ones join by event)."""
        return [d.name for d in self.scenario.devices.explicit or []]

    @property
    def all_devices(self) -> list[str]:
        return [*self.devices, *(d.name for d in self.testbed.standby)]


def parse_profile(data: Any, where: str = "profile") -> Profile:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a mapping at the top level")
    scenario = parse_scenario(data, where)
    try:
        testbed = TestbedSpec.model_validate(scenario.testbed or {})
    except ValidationError as err:
        raise ScenarioError(f"{where}: testbed: {err}") from None
    if scenario.devices.explicit is None:
        raise ScenarioError(f"{where}: a testbed needs devices.explicit (one worker per device)")
    # the standby devices take part in the link matrix, so materialize them with the rest
    everyone = scenario.model_copy(deep=True)
    everyone.devices.explicit = [*scenario.devices.explicit, *testbed.standby]
    everyone.links.pairs = [*scenario.links.pairs, *testbed.links]
    setup = materialize(everyone)
    names = list(setup.cluster.names)
    known = set(names)
    events = list(testbed.events)
    for event in events:
        if event.device not in known:
            raise ScenarioError(f"{where}: event at token {event.at_token} names an unknown device {event.device!r}")
        if event.kind == "memory_limit" and event.memory_bytes is None:
            raise ScenarioError(f"{where}: a memory_limit event needs memory_bytes")
        if event.kind == "join" and event.device not in {d.name for d in testbed.standby}:
            raise ScenarioError(f"{where}: {event.device!r} joins but is not under testbed.standby")
    bandwidth = setup.cluster.bandwidth_bytes_per_second
    rates = {(a, b): float(bandwidth[i, j]) for i, a in enumerate(names) for j, b in enumerate(names) if i != j}
    if scenario.headnode_device is not None:
        h = names.index(scenario.headnode_device)
        for j, b in enumerate(names):
            if j != h:
                rates["headnode", b], rates[b, "headnode"] = float(bandwidth[h, j]), float(bandwidth[j, h])
    specs = [*scenario.devices.explicit, *testbed.standby]
    fastest = max(d.peak_flops_per_second for d in specs)
    cores = {d.name: testbed.max_cores * d.peak_flops_per_second / fastest for d in specs}
    memory = {d.name: int(d.memory_bytes) for d in specs}
    events += load_events(scenario, memory)
    return Profile(scenario, sorted(events, key=lambda e: e.at_token), testbed, rates, cores, memory)


def hog_processes(compute_fraction: float) -> int:
    """Busy loops that take ``compute_fraction`` of a device from its one worker thread, each
    getting a fair share of the device's quota: f / (1 - f), at least one."""
    if compute_fraction >= 0.97:
        return 32
    return max(1, round(compute_fraction / (1.0 - compute_fraction)))


def load_events(scenario: Scenario, memory: dict[str, int]) -> list[Event]:
    """The scenario's scripted background load as testbed events."""
    out = []
    for load in scenario.background.events:
        if load.compute_fraction > 0:
            out += [Event(at_token=load.start_token, kind="cpu_hog", device=load.device,
                          processes=hog_processes(load.compute_fraction)),
                    Event(at_token=load.end_token, kind="cpu_hog_stop", device=load.device)]
        if load.memory_fraction > 0:
            full = memory[load.device]
            out += [Event(at_token=load.start_token, kind="memory_limit", device=load.device,
                          memory_bytes=full * (1 - load.memory_fraction)),
                    Event(at_token=load.end_token, kind="memory_limit", device=load.device, memory_bytes=full)]
    return out


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ScenarioError(f"{path}: cannot read the profile: {err}") from None
    return parse_profile(data, str(path))
