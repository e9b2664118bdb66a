"""The worker's settings: the ``worker`` section of a config file, plus ``grpc`` and ``security``."""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from edgeheads.common.config import (Bytes, DaemonConfig, DialAddress, GrpcSettings, ListenAddress, Seconds, Section,
                                     WILDCARD_HOSTS, lower_str, split_host_port)
from edgeheads.common.security import SecuritySettings


class WorkerSettings(Section):
    """A worker: runs blocks for the head node, registers with the controller."""

    listen: ListenAddress = "0.0.0.0:50061"
    # Prometheus metrics over HTTP (null: none)
    metrics_listen: ListenAddress | None = "0.0.0.0:9161"
    advertise: DialAddress | None = None
    controller: DialAddress = "127.0.0.1:50051"
    name: Annotated[str, Field(min_length=1)] | None = None
    memory_limit_bytes: Annotated[Bytes, Field(gt=0)] | None = None
    device: Annotated[Literal["cpu", "cuda"], BeforeValidator(lower_str)] = "cpu"
    telemetry_period_seconds: Seconds = 1.0
    # probe the links to peer workers this often (a few hundred KiB each); 0: only measure real transfers
    link_probe_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 30.0
    torch_threads: Annotated[int, Field(ge=1)] | None = None
    # the TCP port for relay activations (tcp relay transport), on the host of ``listen``;
    # 0: any free port (peers ask for it over gRPC). Open it in firewalls next to ``listen``.
    relay_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # drop a session that has seen no call for this long, and free its K/V caches (its head
    # node is gone or stopped driving it); 0: keep sessions until the head node drops them
    session_ttl_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 300.0
    # a migration's pre-copy (decoding goes on meanwhile) is pulled at this fraction of the
    # measured bandwidth to its source, so that decoding's relay frames never wait in a queue
    # behind it; the switch's small delta is not paced. 0: pull as fast as the link goes
    precopy_link_fraction: Annotated[float, Field(ge=0, le=1)] = 0.9

    def advertise_address(self, bound_port: int | None = None) -> str:
        """The address other processes should dial to reach this worker.

        ``advertise`` if set; otherwise ``listen`` with a wildcard host replaced by 127.0.0.1 when
        the controller is on this machine, else by the local IP address used to reach the
        controller; and port 0 replaced by ``bound_port`` (the port the server actually bound).
        """
        if self.advertise is not None:
            return self.advertise
        host, port = split_host_port(self.listen)
        if port == 0:
            if not bound_port:
                raise ValueError("listen port is 0: pass the port the server bound as bound_port")
            port = bound_port
        if host in WILDCARD_HOSTS:
            host = _local_ip_towards(split_host_port(self.controller)[0])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



def _local_ip_towards(host: str) -> str:
    """The local IP address the OS would use to reach ``host`` (no packet is sent); 127.0.0.1 on failure."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))  # UDP connect only picks a route
            return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class WorkerConfig(DaemonConfig):
    """What ``edgeheads worker`` reads (see edgeheads.common.config.load_config)."""

    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
