"""Malformed requests to a live worker get the right gRPC status with a message, while a
generation in flight on the same worker completes unchanged. Plus health, reflection,
and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgeheads.headnode import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.generation import encode_prompt
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import controller_pb2, controller_pb2_grpc, headnode_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc
from edgeheads.common.relay_wire import HEADER, Kind, encode, encode_message, read_frame
from edgeheads.common.wire import chunks, sha256_hex, tensor_to_proto, weights_to_blob
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system
NEW_TOKENS = 160


@pytest.fixture(scope="module")
def tiny(save_tiny_model):
    path = save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-bad-requests", seed=2)
    return path, load_model(str(path), progress=False)


@pytest.fixture(scope="module")
def cluster(tiny):
    with LocalCluster(str(tiny[0]), workers=3, progress=False) as c:
        yield c


def call_request(session: str, position: int, block: str, x: torch.Tensor | tensor_pb2.Tensor) -> worker_pb2.CallRequest:
    tensor = x if isinstance(x, tensor_pb2.Tensor) else tensor_to_proto(x)
    return worker_pb2.CallRequest(session=session, position=position,
                                   inputs=[tensor_pb2.NamedTensor(name="x", tensor=tensor)],
                                   ops=[worker_pb2.BlockOp(block_id=block, inputs=["x"], output="a")],
                                   return_values=["a"])


def run_call(stub, request) -> grpc.RpcError | worker_pb2.CallReply:
    try:
        return next(iter(stub.RunCall(iter([request]), timeout=10)))
    except grpc.RpcError as err:
        return err


def load_block(stub, messages) -> grpc.RpcError | worker_pb2.LoadBlockReply:
    try:
        return stub.LoadBlock(iter(messages), timeout=10)
    except grpc.RpcError as err:
        return err


def forward(stub, batches) -> grpc.RpcError | worker_pb2.ForwardReply:
    try:
        return stub.Forward(iter(batches), timeout=10)
    except grpc.RpcError as err:
        return err


def install(stub, block: str, routes: list[worker_pb2.Route]) -> grpc.RpcError | worker_pb2.InstallProgramReply:
    call = worker_pb2.ProgramCall(ops=[worker_pb2.BlockOp(block_id=block, inputs=["x0"], output="a")],
                                  inputs=["x0"], routes=routes)
    try:
        return stub.InstallProgram(worker_pb2.InstallProgramRequest(epoch=99, calls=[call]), timeout=10)
    except grpc.RpcError as err:
        return err


def relay_port_exchange(address: str, port: int, data: bytes) -> list[tuple[Kind, worker_pb2.DriveReply]]:
    """Send raw bytes to a worker's relay TCP port, close our side, and read every frame back."""
    async def go():
        reader, writer = await asyncio.open_connection(address.rsplit(":", 1)[0], port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        frames = []
        while (frame := await asyncio.wait_for(read_frame(reader, 1 << 20), 10)) is not None:
            frames.append((frame[0], worker_pb2.DriveReply.FromString(frame[1])))
        writer.close()
        return frames
    return asyncio.run(go())


def test_malformed_requests_get_precise_statuses_while_a_generation_completes(cluster, tiny):
    path, model = tiny
    hidden = model.parts.shape.hidden_size
    expected = LocalGenerator(model).generate("in flight", SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                            stop_on_eos=False)).token_ids
    with Client(cluster.address) as client:
        placement = client.status()["placement"]
    block, worker = next((b, w) for b, w in placement.items() if b.startswith("attn(0,"))
    result: dict = {"tokens": []}
    first_token = threading.Event()

    def generate() -> None:
        with Client(cluster.address) as c:
            ids = encode_prompt(model.tokenizer, "in flight", None)  # as LocalGenerator encodes it
            for event in c._stub.Generate(headnode_pb2.GenerateRequest(prompt_token_ids=ids,
                                                                        max_new_tokens=NEW_TOKENS)):
                if not event.done:
                    result["tokens"].append(event.token_id)
                    first_token.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert first_token.wait(timeout=120), "the generation never started"  # the bad requests meet a live one
    channel = grpc.insecure_channel(cluster.addresses[worker])
    stub = worker_pb2_grpc.WorkerStub(channel)
    good = torch.randn(1, 1, hidden)
    bad_bytes = tensor_to_proto(good)
    bad_bytes.data = bad_bytes.data[:-4]
    shape_json = json.dumps(model.parts.shape.to_dict())
    weights = model.parts.blocks[next(b for b in model.parts.blocks if str(b) == block)]
    blob = weights_to_blob(weights)
    digest = sha256_hex(blob)
    fresh = weights_to_blob({k: v + 1 for k, v in weights.items()})  # weights the worker does not hold yet
    corrupt = next(chunks(fresh, len(fresh)))
    corrupt.data = corrupt.data[:-1] + bytes([corrupt.data[-1] ^ 0xFF])
    cases = [
        ("wrong dtype", run_call(stub, call_request("s1", 0, block, good.half())), "INVALID_ARGUMENT", "dtype"),
        ("wrong shape", run_call(stub, call_request("s1", 0, block, torch.randn(1, 1, hidden + 1))), "INVALID_ARGUMENT",
         "shape"),
        ("bytes do not match shape", run_call(stub, call_request("s1", 0, block, bad_bytes)), "INVALID_ARGUMENT", "bytes"),
        ("unknown dtype", run_call(stub, call_request("s1", 0, block, tensor_pb2.Tensor(dtype="complex7", shape=[1]))),
         "INVALID_ARGUMENT", "unknown dtype"),
        ("unknown session", run_call(stub, call_request("nobody", 7, block, good)), "NOT_FOUND", "unknown session"),
        ("unknown block", run_call(stub, call_request("s1", 0, "attn(99,0)", good)), "NOT_FOUND", "not on worker"),
        ("malformed block id", run_call(stub, call_request("s1", 0, "attention-zero", good)), "INVALID_ARGUMENT",
         "not a block id"),
        ("corrupt weights", load_block(stub, [worker_pb2.LoadBlockChunk(
            block_id=block, model_shape_json=shape_json, content_hash=sha256_hex(fresh), chunk=corrupt)]), "DATA_LOSS",
         "checksum mismatch"),
        ("weights under a wrong hash", load_block(stub, [worker_pb2.LoadBlockChunk(
            block_id=block, model_shape_json=shape_json, content_hash="0" * 64,
            chunk=next(chunks(blob, len(blob))))]), "DATA_LOSS", "content hash"),
        ("truncated weights", load_block(stub, [worker_pb2.LoadBlockChunk(
            block_id=block, model_shape_json=shape_json, content_hash=sha256_hex(fresh),
            chunk=next(chunks(fresh, max(1, len(fresh) // 2))))]), "DATA_LOSS", "without its last chunk"),
        ("corrupt relay message", forward(stub, [worker_pb2.ValueBatch(
            session="s1", epoch=1, position=0, values=[tensor_pb2.NamedTensor(name="x0", tensor=bad_bytes)])]),
         "INVALID_ARGUMENT", "bytes"),
        ("relay program with a block not here", install(stub, "attn(99,0)", []), "NOT_FOUND", "not on worker"),
        ("relay program routing to itself", install(stub, block, [worker_pb2.Route(destination=worker, values=["a"])]),
         "INVALID_ARGUMENT", "itself"),
        ("bad model shape", load_block(stub, [worker_pb2.LoadBlockChunk(
            block_id=block, model_shape_json='{"arch": "bert"}', content_hash=digest)]), "INVALID_ARGUMENT",
         "model shape"),
    ]
    # the same values sent to the relay TCP port (the tcp relay transport) as frames
    port = stub.RelayEndpoint(worker_pb2.RelayEndpointRequest()).port
    hello = encode_message(Kind.HELLO_FORWARD, worker_pb2.ValueBatch(epoch=99))
    corrupt_batch = encode_message(Kind.BATCH, worker_pb2.ValueBatch(
        session="s1", epoch=99, position=0, values=[tensor_pb2.NamedTensor(name="x0", tensor=bad_bytes)]))
    flipped = encode_message(Kind.BATCH, worker_pb2.ValueBatch(session="s1", epoch=99))
    flipped = flipped[:-1] + bytes([flipped[-1] ^ 0x40])
    relay_cases = [
        ("not a relay frame", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "INVALID_ARGUMENT", "not an edgeheads relay"),
        ("no hello", corrupt_batch, "INVALID_ARGUMENT", "must open with a hello"),
        ("corrupt relay frame", hello + flipped, "DATA_LOSS", "checksum mismatch"),
        ("truncated relay frame", hello + corrupt_batch[:-5], "DATA_LOSS", "ended"),
        ("oversized relay frame", hello + HEADER.pack(b"EHR1", Kind.BATCH, bytes(3), 1 << 30, 0), "RESOURCE_EXHAUSTED",
         "exceeds the limit"),
        ("not a ValueBatch", hello + encode(Kind.BATCH, b"\xff" * 9), "INVALID_ARGUMENT", "not a valid ValueBatch"),
        ("malformed tensor in a relay frame", hello + corrupt_batch, "INVALID_ARGUMENT", "bytes"),
    ]
    relay_got = [(name, relay_port_exchange(cluster.addresses[worker], port, data), code, message)
                 for name, data, code, message in relay_cases]
    thread.join(timeout=300)
    for name, frames, code, message in relay_got:
        assert [k for k, _ in frames] == [Kind.ERROR], f"{name}: {frames}"
        assert frames[0][1].error_code == code, f"{name}: {frames[0][1]}"
        assert message in frames[0][1].error_message, f"{name}: {frames[0][1].error_message}"
    for name, got, code, message in cases:
        assert isinstance(got, grpc.RpcError), f"{name}: accepted"
        assert got.code().name == code, f"{name}: {got.code().name} {got.details()}"
        assert message in got.details(), f"{name}: {got.details()}"
    assert result["tokens"] == expected
    # the worker still serves: its blocks are intact and a fresh generation is still exact
    telemetry = stub.GetTelemetry(worker_pb2.TelemetryRequest())
    assert block in telemetry.blocks and telemetry.sessions == 0
    with Client(cluster.address) as client:
        assert len(client.generate_full("again", max_new_tokens=5).token_ids) >= 1
    channel.close()


def test_every_daemon_serves_health_and_reflection(cluster):
    expected = {"controller": "edgeheads.v1.Controller", "worker-0": "edgeheads.v1.Worker",
                "headnode": "edgeheads.v1.Headnode"}
    for name, service in expected.items():
        with grpc.insecure_channel(cluster.addresses[name]) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(iter(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]))))
            names = {s.name for s in reply.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_sigterm_stops_a_worker_cleanly_and_the_controller_notices(tmp_path):
    def spawn(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgeheads.headnode.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def wait_file(path, proc) -> str:
        # the daemons signal readiness by writing a file from another process: no event to wait
        # on here, so poll with a deadline
        deadline = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return path.read_text()

    controller = spawn("controller", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c"))
    try:
        caddr = wait_file(tmp_path / "c", controller)
        worker = spawn("worker", "--listen", "127.0.0.1:0", "--controller", caddr, "--name", "w-term",
                       "--ready-file", str(tmp_path / "w"))
        wait_file(tmp_path / "w", worker)
        with grpc.insecure_channel(caddr) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            assert [w.name for w in stub.ListWorkers(controller_pb2.ListWorkersRequest()).workers] == ["w-term"]
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
            output = worker.stdout.read()
            assert "Traceback" not in output
            # the controller drops the worker when its telemetry stream closes; nothing announces
            # that to a client (membership has no watch call), so poll with a deadline
            deadline = time.monotonic() + 10
            while stub.ListWorkers(controller_pb2.ListWorkersRequest()).workers:
                assert time.monotonic() < deadline, "controller still lists the stopped worker"
                time.sleep(0.1)
    finally:
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(timeout=30) == 0
