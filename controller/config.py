"""The controller's settings: the ``controller`` section of a config file, plus ``grpc`` and ``security``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from edgeheads.common.config import DaemonConfig, GrpcSettings, ListenAddress, Seconds, Section
from edgeheads.common.security import SecuritySettings


DEFAULT_POLICY = "resource-aware"


class ControllerSettings(Section):
    """The controller: tracks workers by heartbeat and serves placements."""

    listen: ListenAddress = "0.0.0.0:50051"
    metrics_listen: ListenAddress | None = "0.0.0.0:9151"
    heartbeat_timeout_seconds: Seconds = 5.0
    # the policy that won the testbed's scripted-load runs (docs/decisions.md, "The default policy")
    policy: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")] = DEFAULT_POLICY
    # re-plan after this many decoded tokens (0: only on membership changes)
    replan_every_tokens: Annotated[int, Field(ge=0)] = 16
    # ... and at least this often in seconds (0: no timer), so a change in load is noticed while idle
    replan_every_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    # re-plans that pay (controller/replan_gate.py): placement algorithms plan on smoothed telemetry
    # and move blocks only when the gain over how long conditions last beats the migration's cost
    replan_gate: bool = True
    # EWMA time constant of the smoothed telemetry (0: plan on the latest report)
    telemetry_smoothing_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 3.0
    # decoding runs this many times slower while a migration pre-copies (benchmarks/migration_netns.py)
    precopy_slowdown: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 2.7
    # the "shuffle" test policy moves this many random blocks per re-plan, from this seed
    shuffle_moves: Annotated[int, Field(ge=1)] = 2
    shuffle_seed: int = 0


class ControllerConfig(DaemonConfig):
    """What ``edgeheads controller`` reads (see edgeheads.common.config.load_config)."""

    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
