"""What the restart and orphan tests read from a running cluster's daemons over gRPC, and a
way to wait until it holds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from edgeheads.v1 import (controller_pb2, controller_pb2_grpc, headnode_pb2, headnode_pb2_grpc, worker_pb2,
                          worker_pb2_grpc)

T = TypeVar("T")


def worker_telemetry(address: str) -> worker_pb2.WorkerTelemetry:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetTelemetry(worker_pb2.TelemetryRequest(), timeout=10)


def headnode_status(address: str) -> headnode_pb2.StatusReply:
    with grpc.insecure_channel(address) as channel:
        return headnode_pb2_grpc.HeadnodeStub(channel).Status(headnode_pb2.StatusRequest(), timeout=10)


def placement(address: str) -> dict[str, str]:
    """The head node's placement in use: block -> worker."""
    return json.loads(headnode_status(address).placement_json)


def controller_status(address: str) -> controller_pb2.ControllerStatusReply:
    with grpc.insecure_channel(address) as channel:
        return controller_pb2_grpc.ControllerStub(channel).Status(controller_pb2.ControllerStatusRequest(),
                                                                  timeout=10)


def wait_until(check: Callable[[], T], timeout_seconds: float, what: str, every: float = 0.1) -> T:
    """``check()`` once it is truthy (gRPC errors count as not yet)."""
    deadline = time.monotonic() + timeout_seconds
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_seconds:g} s (last: {last})"
        time.sleep(every)
