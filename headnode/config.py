"""The head node's settings, and the whole-cluster config that ``edgeheads up`` and the
example file use (the head node is the top of the import order, so it may name every section)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from edgeheads.common.formats import parse_dtype
from edgeheads.headnode.dtype_choice import AUTO

from edgeheads.common.config import DaemonConfig, DialAddress, GrpcSettings, ListenAddress, Section
from edgeheads.common.security import SecuritySettings
from edgeheads.controller.config import ControllerSettings
from edgeheads.worker.config import WorkerSettings


def _known_dtype(value: object) -> object:
    """``auto`` or a format ``formats.parse_dtype`` reads; anything else fails at load time of the
    config, not after the model has loaded."""
    if isinstance(value, str) and value.strip().lower() != AUTO:
        parse_dtype(value)
    return value.strip().lower() if isinstance(value, str) else value


def _off_is_none(value: object) -> object:
    """``off`` (or ``null``, ``none``) turns a listener off where YAML's null cannot be written:
    an environment variable, a flag."""
    return None if isinstance(value, str) and value.strip().lower() in ("off", "null", "none") else value


class HeadnodeSettings(Section):
    """The head node: loads the model, ships blocks, drives decoding, serves ``Generate``."""

    listen: ListenAddress = "0.0.0.0:50050"
    metrics_listen: ListenAddress | None = "0.0.0.0:9150"
    # the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions); null or off: none
    http_listen: Annotated[ListenAddress | None, BeforeValidator(_off_is_none)] = "0.0.0.0:8080"
    controller: DialAddress = "127.0.0.1:50051"
    model: Annotated[str, Field(min_length=1)] = "smollm2-135m"
    # weight format and compute dtype: auto (the file's own quantization, or the CPU's best
    # float), fp32, bf16, fp16, int8, q4, or int8/q4 with a compute dtype (q4:fp32)
    dtype: Annotated[str, AfterValidator(_known_dtype)] = AUTO
    min_workers: Annotated[int, Field(ge=1)] = 1
    worker_wait_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 60.0
    # relay: workers pass activations to each other (one network hop per phase);
    # head: every phase goes through the head node (a round trip per phase)
    dataflow: Literal["relay", "head"] = "relay"
    # how relay activations travel: tcp (frames on each worker's relay port; fastest) or
    # grpc (Drive/Forward streams; only the gRPC port needs to be reachable)
    relay_transport: Literal["tcp", "grpc"] = "tcp"
    step_timeout_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    # give up a migration (and keep the old placement) after this many seconds
    migration_timeout_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    # where a migrating block's weights come from: the head node, which holds every block's
    # (the source then exports only K/V caches), or the block's current worker
    migration_weights: Literal["headnode", "source"] = "headnode"
    # sessions (gRPC and HTTP generations together) that may run at once; one more is refused
    # with RESOURCE_EXHAUSTED (HTTP 429). null or off: no limit but the workers' memory
    max_sessions: Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_off_is_none)] = 32


class HeadnodeConfig(DaemonConfig):
    """What ``edgeheads headnode`` reads (see edgeheads.common.config.load_config)."""

    headnode: HeadnodeSettings = Field(default_factory=HeadnodeSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)


class ClusterConfig(DaemonConfig):
    """Every section: one file that configures a whole cluster (deploy/edgeheads.example.yaml)."""

    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    headnode: HeadnodeSettings = Field(default_factory=HeadnodeSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
