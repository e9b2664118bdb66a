"""One gRPC channel and stub per worker, opened on first use and kept for the head node's life."""

from __future__ import annotations

import grpc

from edgeheads.common.channels import open_channel
from edgeheads.common.config import GrpcSettings
from edgeheads.v1 import worker_pb2_grpc


class WorkerChannels:
    def __init__(self, grpc_settings: GrpcSettings) -> None:
        self.grpc_settings = grpc_settings
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}  # worker name -> stub; shared, never copied

    def stub(self, worker: str, address: str) -> worker_pb2_grpc.WorkerStub:
        if worker not in self.stubs:
            self.channels[worker] = open_channel(address, self.grpc_settings)  # the process's TLS and token
            self.stubs[worker] = worker_pb2_grpc.WorkerStub(self.channels[worker])
        return self.stubs[worker]

    def connect(self, addresses: dict[str, str]) -> None:
        for worker, address in addresses.items():
            self.stub(worker, address)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
