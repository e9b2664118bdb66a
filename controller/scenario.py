"""Simulation scenarios: a documented YAML format, its loader, and a generator of
random scenario families (``paper-small``, ``paper-medium``).

Every field carries its unit in its name. A random quantity is written as one of

    {value: X}                                   a constant
    {uniform: [LOW, HIGH]}                       uniform on [LOW, HIGH]
    {lognormal: {median: M, sigma: S}, clip: [LOW, HIGH]}   log-normal, clipped (clip optional)

Example (all fields; docs/placement.md explains each)::

    name: demo
    seed: 1
    model: {name: smollm2-135m}          # or {shape: {arch: llama, n_layers: 2, ...}}; bytes_per_param optional
    prompt_tokens: 64
    new_tokens: 200
    interval_tokens: 1
    migration_horizon_tokens: 0          # 0 = interval_tokens (the paper's myopic objective)
    headnode_device: null                # a device name, or null for no head-node messages
    swap_bandwidth_bytes_per_second: 2.0e8
    devices:
      count: 5
      memory_bytes: {lognormal: {median: 4.0e9, sigma: 0.5}, clip: [2.0e9, 8.0e9]}
      peak_flops_per_second: {uniform: [5.0e9, 5.0e10]}
      # or: explicit: [{name: a, memory_bytes: 4.0e9, peak_flops_per_second: 2.0e10}, ...]
    links:
      bandwidth_bytes_per_second: {uniform: [1.25e7, 1.25e8]}
      latency_seconds: {value: 0.002}
      pairs: [{source: a, destination: b, bandwidth_bytes_per_second: 1.0e8, latency_seconds: 0.001}]
    background:
      start_probability_per_token: 0.005
      duration_tokens: {uniform: [50, 300]}
      compute_fraction: {uniform: [0.3, 0.9]}
      memory_fraction: {uniform: [0.0, 0.3]}
      bandwidth_jitter_fraction: 0.1
      events:                            # optional scripted load, on top of the random jobs
        - {device: dev1, start_token: 100, end_token: 400, compute_fraction: 0.9, memory_fraction: 0.0}
    testbed: {max_cores: 1.0}            # optional: read by deploy/testbed (docs/testbed.md) only
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeheads.controller.problem import Cluster, Device, ModelDemand
from edgeheads.common.spec import GPT2_SMALL, LLAMA2_7B, SMOLLM2_135M, ModelShape

NAMED_SHAPES: dict[str, ModelShape] = {"smollm2-135m": SMOLLM2_135M, "llama2-7b": LLAMA2_7B, "gpt2-small": GPT2_SMALL}


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says what is wrong and where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantity(_Strict):
    """A constant or a distribution (see the module docstring)."""

    value: float | None = None
    uniform: tuple[float, float] | None = None
    lognormal: dict[str, float] | None = None
    clip: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Quantity":
        kinds = [k for k in ("value", "uniform", "lognormal") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of value, uniform or lognormal")
        if self.lognormal is not None and set(self.lognormal) != {"median", "sigma"}:
            raise ValueError("lognormal needs exactly {median, sigma}")
        if self.uniform is not None and self.uniform[0] > self.uniform[1]:
            raise ValueError("uniform: [LOW, HIGH] with LOW <= HIGH")
        return self

    def draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        if self.value is not None:
            out = np.full(size, float(self.value))
        elif self.uniform is not None:
            out = rng.uniform(self.uniform[0], self.uniform[1], size)
        else:
            assert self.lognormal is not None
            out = rng.lognormal(np.log(self.lognormal["median"]), self.lognormal["sigma"], size)
        if self.clip is not None:
            out = np.clip(out, self.clip[0], self.clip[1])
        return out


class ModelSpec(_Strict):
    name: str | None = None
    shape: dict[str, Any] | None = None
    bytes_per_param: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "ModelSpec":
        if (self.name is None) == (self.shape is None):
            raise ValueError("give either model.name or model.shape")
        if self.name is not None and self.name not in NAMED_SHAPES:
            raise ValueError(f"unknown model name {self.name!r}; known: {', '.join(NAMED_SHAPES)}")
        return self

    def model_shape(self) -> ModelShape:
        if self.name is not None:
            shape = NAMED_SHAPES[self.name]
        else:
            try:
                shape = ModelShape(**(self.shape or {}))
            except (TypeError, ValueError) as err:
                raise ScenarioError(f"model.shape: {err}") from err
        if self.bytes_per_param is not None:
            shape = dataclasses.replace(shape, bytes_per_param=self.bytes_per_param)
        return shape


class DeviceSpec(_Strict):
    name: str
    memory_bytes: float = Field(ge=0)
    peak_flops_per_second: float = Field(gt=0)


class DevicesSpec(_Strict):
    count: int | None = Field(default=None, ge=1)
    memory_bytes: Quantity | None = None
    peak_flops_per_second: Quantity | None = None
    explicit: list[DeviceSpec] | None = None

    @model_validator(mode="after")
    def _one(self) -> "DevicesSpec":
        if self.explicit is None and (self.count is None or self.memory_bytes is None or self.peak_flops_per_second is None):
            raise ValueError("give devices.explicit, or devices.count with memory_bytes and peak_flops_per_second")
        if self.explicit is not None and not self.explicit:
            raise ValueError("devices.explicit is empty")
        return self


class LinkSpec(_Strict):
    source: str
    destination: str
    bandwidth_bytes_per_second: float = Field(gt=0)
    latency_seconds: float = Field(ge=0)


class LinksSpec(_Strict):
    bandwidth_bytes_per_second: Quantity
    latency_seconds: Quantity = Quantity(value=0.001)
    pairs: list[LinkSpec] = []


class LoadEvent(_Strict):
    """Scripted load on one device for tokens [start_token, end_token)."""

    device: str
    start_token: int = Field(ge=0)
    end_token: int = Field(ge=0)
    compute_fraction: float = Field(default=0.0, ge=0, le=1)
    memory_fraction: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "LoadEvent":
        if self.end_token <= self.start_token:
            raise ValueError("end_token must be after start_token")
        return self


class BackgroundSpec(_Strict):
    start_probability_per_token: float = Field(default=0.0, ge=0, le=1)
    duration_tokens: Quantity = Quantity(value=100)
    compute_fraction: Quantity = Quantity(uniform=(0.3, 0.9))
    memory_fraction: Quantity = Quantity(value=0.0)
    bandwidth_jitter_fraction: float = Field(default=0.0, ge=0, lt=1)
    events: list[LoadEvent] = []


class Scenario(_Strict):
    name: str = "scenario"
    seed: int = 0
    model: ModelSpec
    prompt_tokens: int = Field(ge=1)
    new_tokens: int = Field(ge=1)
    interval_tokens: int = Field(default=1, ge=1)
    migration_horizon_tokens: int = Field(default=0, ge=0)
    headnode_device: str | None = None
    swap_bandwidth_bytes_per_second: float = Field(default=2.0e8, gt=0)
    devices: DevicesSpec
    links: LinksSpec
    background: BackgroundSpec = BackgroundSpec()
    # what the emulated testbed adds (deploy/testbed/testbed_profile.py: CPU scale, standby
    # devices, membership and memory-limit events); the simulator does not read it
    testbed: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """A scenario with its random draws made: what the simulator runs."""

    scenario: Scenario
    shape: ModelShape
    demand: ModelDemand
    cluster: Cluster
    headnode: int | None


def materialize(scenario: Scenario) -> Setup:
    """Draw devices and links from the scenario's seed (same seed, same cluster)."""
    rng = np.random.default_rng(scenario.seed)
    spec = scenario.devices
    if spec.explicit is not None:
        devices = [Device(d.name, d.memory_bytes, d.peak_flops_per_second, d.peak_flops_per_second) for d in spec.explicit]
    else:
        assert spec.count and spec.memory_bytes and spec.peak_flops_per_second
        mem = spec.memory_bytes.draw(rng, spec.count)
        flops = spec.peak_flops_per_second.draw(rng, spec.count)
        devices = [Device(f"dev{i}", float(mem[i]), float(flops[i]), float(flops[i])) for i in range(spec.count)]
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ScenarioError("devices: names must be unique")
    n = len(devices)
    bw = scenario.links.bandwidth_bytes_per_second.draw(rng, (n, n))
    lat = scenario.links.latency_seconds.draw(rng, (n, n))
    index = {name: i for i, name in enumerate(names)}
    for pair in scenario.links.pairs:
        for end in (pair.source, pair.destination):
            if end not in index:
                raise ScenarioError(f"links.pairs names an unknown device {end!r}")
        bw[index[pair.source], index[pair.destination]] = pair.bandwidth_bytes_per_second
        lat[index[pair.source], index[pair.destination]] = pair.latency_seconds
    if np.any(bw[~np.eye(n, dtype=bool)] <= 0):
        raise ScenarioError("links.bandwidth_bytes_per_second must be positive")
    for event in scenario.background.events:
        if event.device not in index:
            raise ScenarioError(f"background.events names an unknown device {event.device!r}")
    headnode = None
    if scenario.headnode_device is not None:
        if scenario.headnode_device not in index:
            raise ScenarioError(f"headnode_device {scenario.headnode_device!r} is not a device")
        headnode = index[scenario.headnode_device]
    shape = scenario.model.model_shape()
    return Setup(scenario, shape, ModelDemand.from_shape(shape), Cluster.from_devices(devices, bw, lat), headnode)


def parse_scenario(data: Any, where: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        lines = [f"{where}: invalid scenario"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {loc}: {e['msg']}")
        raise ScenarioError("\n".join(lines)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError with a readable message."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ScenarioError(f"{path}: not valid YAML ({err})") from None
    return parse_scenario(data, str(path))


# ----------------------------------------------------------------------------- generator

FAMILIES = ("paper-small", "paper-medium")


def generate(family: str, seed: int) -> dict[str, Any]:
    """A random scenario of ``family`` as a plain dict (dump it with yaml.safe_dump).

    paper-small: 3-5 devices, a 2-layer model with 2-3 KV groups whose blocks need
    30-60% of the devices' memory, so that placement is constrained; 24 tokens,
    a decision every 4 tokens, light background load.
    paper-medium: the paper's §V-D setting: 25 devices, 2-8 GB, 5-50 GFLOPS,
    0.1-1 Gbit/s links, a 7B-class model in fp16, 1000 new tokens, a decision every
    token, background jobs that take compute and memory, migrations weighed over
    100 tokens.
    """
    rng = np.random.default_rng(seed)
    if family == "paper-small":
        n = int(rng.integers(3, 6))
        groups = int(rng.integers(2, 4))
        shape = {
            "arch": "llama", "n_layers": 2, "hidden_size": 512, "n_heads": 4 * groups, "n_kv_heads": groups,
            "head_dim": 64, "intermediate_size": 1536, "vocab_size": 1000, "bytes_per_param": 4,
        }
        model_bytes = float(ModelDemand.from_shape(ModelShape(**shape)).memory_bytes(32).sum())
        share = rng.uniform(0.5, 1.5, n)
        memory = share / share.sum() * model_bytes / rng.uniform(0.3, 0.6)
        flops = rng.lognormal(np.log(1.5e10), 0.6, n).clip(5e9, 5e10)
        return {
            "name": f"paper-small-{seed}",
            "seed": seed,
            "model": {"shape": shape},
            "prompt_tokens": 8,
            "new_tokens": 24,
            "interval_tokens": 4,
            "migration_horizon_tokens": 0,
            "headnode_device": None,
            "swap_bandwidth_bytes_per_second": 2.0e8,
            "devices": {
                "explicit": [
                    {"name": f"dev{i}", "memory_bytes": float(memory[i]), "peak_flops_per_second": float(flops[i])}
                    for i in range(n)
                ]
            },
            "links": {"bandwidth_bytes_per_second": {"uniform": [1.25e7, 1.25e8]}, "latency_seconds": {"uniform": [0.0005, 0.003]}},
            "background": {
                "start_probability_per_token": 0.05,
                "duration_tokens": {"uniform": [4, 16]},
                "compute_fraction": {"uniform": [0.3, 0.8]},
                "memory_fraction": {"value": 0.0},
                "bandwidth_jitter_fraction": 0.1,
            },
        }
    if family == "paper-medium":
        return {
            "name": f"paper-medium-{seed}",
            "seed": seed,
            "model": {"name": "llama2-7b"},
            "prompt_tokens": 128,
            "new_tokens": 1000,
            "interval_tokens": 1,
            "migration_horizon_tokens": 100,
            "headnode_device": "dev0",
            "swap_bandwidth_bytes_per_second": 2.0e8,
            "devices": {
                "count": 25,
                "memory_bytes": {"lognormal": {"median": 4.0e9, "sigma": 0.5}, "clip": [2.0e9, 8.0e9]},
                "peak_flops_per_second": {"lognormal": {"median": 1.6e10, "sigma": 0.7}, "clip": [5.0e9, 5.0e10]},
            },
            "links": {"bandwidth_bytes_per_second": {"uniform": [1.25e7, 1.25e8]}, "latency_seconds": {"uniform": [0.001, 0.005]}},
            "background": {
                "start_probability_per_token": 0.002,
                "duration_tokens": {"uniform": [100, 400]},
                "compute_fraction": {"uniform": [0.5, 0.9]},
                "memory_fraction": {"uniform": [0.0, 0.6]},
                "bandwidth_jitter_fraction": 0.2,
            },
        }
    raise ScenarioError(f"unknown scenario family {family!r}; known: {', '.join(FAMILIES)}")
