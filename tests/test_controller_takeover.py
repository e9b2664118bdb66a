"""A controller that restarted takes over the placement a head node uses (SetModel with the
epoch and assignments in use): it waits for the workers to register again, keeps the
placement when it still fits (nothing moves), and numbers its epochs on from the head
node's. Also the head node's pure helpers for workers that restarted under their name."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from edgeheads.common.spec import SMOLLM2_135M, BlockId
from edgeheads.controller import service as service_module
from edgeheads.controller.membership import ClusterState, WorkerRecord
from edgeheads.controller.service import ControllerService
from edgeheads.headnode.placement_feed import PlacementAnswer, returning
from edgeheads.headnode.recovery_plan import restarted_workers
from edgeheads.v1 import controller_pb2, controller_pb2_grpc

GiB = 1 << 30


def worker(i: int, port: int | None = None) -> WorkerRecord:
    return WorkerRecord(f"w{i}", f"127.0.0.1:{port or 5000 + i}", 4 * GiB, 2e10)


def placement_in_use(policy: str = "spread") -> tuple[dict[BlockId, str], dict[str, str]]:
    """What a head node runs: the first placement of a controller that has since gone."""
    old = ClusterState(policy)
    for i in range(3):
        old.register(worker(i))
    old.set_model(SMOLLM2_135M, "smollm2")
    return dict(old.current.placement), dict(old.current.addresses)


def fresh(policy: str = "spread") -> ClusterState:
    state = ClusterState(policy)
    state.announce_model(SMOLLM2_135M, "smollm2")
    return state


@pytest.mark.parametrize("policy", ["spread", "round-robin"])
def test_the_placement_in_use_is_kept_when_every_worker_is_back(policy):
    placement, addresses = placement_in_use(policy)
    state = fresh(policy)
    state.register(worker(0))
    assert state.adopt(7, placement, addresses, grace_seconds=60)
    assert state.current.epoch == 7 and state.current.placement == placement
    assert state.rejoining() == {"w1", "w2"}
    assert state.plan_inputs() is None and state.replan("w1 joined").epoch == 7  # no plan meanwhile
    for i in (1, 2):
        state.register(worker(i))
    assert state.rejoining() == set()
    assert state.replan("model announced again").epoch == 7  # the same placement: no new epoch
    assert state.decisions[-1].blocks_moved == 0 and "taken over" in state.decisions[-1].reason
    state.remove("w2", "test")  # later epochs go on from the head node's
    assert state.replan("w2 left").epoch == 8


def test_a_worker_that_does_not_come_back_within_the_grace_has_only_its_blocks_moved():
    placement, addresses = placement_in_use()
    state = fresh()
    state.register(worker(0))
    state.register(worker(1))
    assert state.adopt(3, placement, addresses, grace_seconds=60)
    assert state.rejoining() == {"w2"}
    assert state.rejoining(now=float("inf")) == set()  # the grace is over
    new = state.replan("model announced again")
    assert new.epoch == 4 and "w2" not in set(new.placement.values())
    assert all(new.placement[b] == w for b, w in placement.items() if w != "w2")


def test_a_worker_back_at_another_address_keeps_its_blocks_in_a_new_epoch():
    placement, addresses = placement_in_use()
    state = fresh()
    for i in range(3):
        state.register(worker(i, port=6000 + i if i == 1 else None))
    assert state.adopt(3, placement, addresses, grace_seconds=60)
    new = state.replan("model announced again")
    assert new.epoch == 4 and new.placement == placement and new.addresses["w1"] == "127.0.0.1:6001"


def test_a_controller_that_is_not_behind_or_a_placement_of_another_model_is_not_taken_over():
    placement, addresses = placement_in_use()
    state = fresh()
    for i in range(3):
        state.register(worker(i))
    state.replan("model announced")
    assert state.current.epoch == 1
    assert not state.adopt(1, placement, addresses, grace_seconds=60)  # not behind
    partial = dict(list(placement.items())[1:])
    assert not fresh().adopt(5, partial, addresses, grace_seconds=60)  # not every block of the model
    assert not ClusterState("spread").adopt(5, placement, addresses, grace_seconds=60)  # no model announced


def test_set_model_with_the_placement_in_use_waits_for_the_workers_and_moves_nothing(monkeypatch):
    monkeypatch.setattr(service_module, "REJOIN_GRACE_SECONDS", 30.0)
    placement, addresses = placement_in_use()
    state = ClusterState("spread")
    state.register(worker(0))

    async def run() -> None:
        server = grpc.aio.server()
        controller_pb2_grpc.add_ControllerServicer_to_server(ControllerService(state), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = controller_pb2_grpc.ControllerStub(channel)
                request = controller_pb2.SetModelRequest(
                    model_shape_json=json.dumps(SMOLLM2_135M.to_dict()), model_name="smollm2", epoch=9,
                    assignments=[controller_pb2.Assignment(block_id=str(b), worker=w, address=addresses[w])
                                 for b, w in placement.items()])
                set_model = asyncio.ensure_future(stub.SetModel(request, timeout=60))
                for i in (1, 2):  # the others come back one after the other
                    await asyncio.sleep(0.3)
                    assert not set_model.done(), "planned before the workers were back"
                    await stub.Register(controller_pb2.RegisterRequest(
                        name=f"w{i}", address=addresses[f"w{i}"], memory_available_bytes=4 * GiB,
                        compute_flops=2e10), timeout=10)
                reply = await set_model
                assert reply.epoch == 9 and not reply.error
                assert {BlockId.parse(a.block_id): a.worker for a in reply.assignments} == placement
                bad = controller_pb2.SetModelRequest(model_shape_json=request.model_shape_json, epoch=10,
                                                     assignments=[controller_pb2.Assignment(block_id="attn(0,0)")])
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SetModel(bad, timeout=10)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(None)
    asyncio.run(run())
    assert [d.blocks_moved for d in state.decisions] == [0]


def test_a_worker_that_answers_without_its_blocks_restarted():
    a, b, c = BlockId.parse("attn(0,0)"), BlockId.parse("proj(0)"), BlockId.parse("ffn(0)")
    placement = {a: "w0", b: "w1", c: "w1"}
    held = {"w0": {a}, "w1": set(), "w2": None}
    assert restarted_workers(placement, held) == {"w1"}
    assert restarted_workers(placement, {"w0": {a}, "w1": {b, c}}) == set()
    assert restarted_workers(placement, {"w1": {b}}) == {"w1"}  # one block missing is enough


def test_a_placement_that_uses_a_lost_worker_again_says_it_returned():
    a = BlockId.parse("attn(0,0)")
    again = PlacementAnswer(5, {a: "w1"}, {"w1": "h:2"})
    assert returning(again, {"w1", "w2"}, after_epoch=4) == {"w1"}
    assert returning(again, {"w1"}, after_epoch=5) == set()  # not newer
    assert returning(PlacementAnswer(6, {a: "w1"}, {}, error="no room"), {"w1"}, after_epoch=4) == set()
