"""A reply made before the head node's drive for its epoch registered waits for that drive."""

from __future__ import annotations

from edgeheads.common.config import GrpcSettings
from edgeheads.v1 import worker_pb2
from edgeheads.worker.host import BlockHost
from edgeheads.worker.relay_endpoint import MAX_HELD_REPLIES, RelayEndpoint


def installed(epoch: int) -> RelayEndpoint:
    """An endpoint that holds a program for ``epoch`` (its calls do not matter here)."""
    endpoint = RelayEndpoint(BlockHost("w"), GrpcSettings())
    endpoint.executor.programs[epoch] = []
    return endpoint


def reply(session: str, position: int = 0, epoch: int = 5) -> worker_pb2.DriveReply:
    return worker_pb2.DriveReply(session=session, epoch=epoch, position=position)


def test_a_reply_before_its_drive_is_delivered_when_the_drive_attaches():
    endpoint = installed(5)
    endpoint.to_head(5, reply("early"))
    got: list[str] = []
    endpoint.attach_drive(5, lambda r: got.append(r.session))
    assert got == ["early"]
    endpoint.to_head(5, reply("later", 1))
    assert got == ["early", "later"]


def test_replies_of_an_epoch_with_no_program_are_dropped_and_holding_is_bounded():
    endpoint = installed(5)
    endpoint.to_head(9, reply("stray", epoch=9))  # no program for epoch 9: nothing will ever drive it
    for i in range(MAX_HELD_REPLIES + 10):
        endpoint.to_head(5, reply("s", i))
    got9: list[str] = []
    got5: list[int] = []
    endpoint.attach_drive(9, lambda r: got9.append(r.session))
    endpoint.attach_drive(5, lambda r: got5.append(r.position))
    assert got9 == []
    assert got5 == list(range(MAX_HELD_REPLIES))
