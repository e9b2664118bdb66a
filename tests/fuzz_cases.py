"""Seeded fuzz cases for every RPC of every edgeheads daemon and every relay frame kind
(tests/test_fuzz.py runs 2,000 of them, benchmarks/fuzz.py 10,000 or more; fuzz_run.py sends them).

A case is bytes on the wire: gRPC requests are serialized here and sent with identity
serializers, so a case can be a valid message, a mutated one, or bytes no parser accepts.
Each request is built one of three ways: near-valid for its method (a real block, a wrong
dtype, a shape that disagrees with the data...), a random message of the method's type
(every field by its descriptor, with extreme numbers, odd strings and random bytes), or a
valid serialization broken at byte level (truncated, bit-flipped, random).

The cluster is busy with a real generation meanwhile, and some RPCs change its state by design
(UnloadBlocks of a real block, a drive hello for the live epoch, Register of a new worker...).
So every request passes ``defang`` before it goes: whatever decodes to such a request is
changed so that it cannot name the live generation's objects (a block id no model has, an epoch
that is never live, a value name no program reads, a worker name nobody registered). What is
left is hostile input only: anything a daemon then does to the generation is a bug.

Epoch 0 is the fuzzer's own: the head node's epochs start at 1, so relay programs installed,
drives attached and batches run there can only touch the fuzz sessions' caches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field

from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from edgeheads.common.spec import BlockId, ModelShape
from edgeheads.v1 import controller_pb2, headnode_pb2, tensor_pb2, worker_pb2
from fuzz_values import FLOATS, RESERVE, SIGNED, UNSIGNED, break_bytes, mutate, rand_bytes, rand_string, rand_tensor, \
    random_message

FUZZ_EPOCH = 0  # never a live epoch: the only one where programs install and batches may run
FAR_EPOCH = 1 << 40  # never live either, and never has a program: drive hellos for nobody
JUNK = "~fz"  # a value name no relay program reads: a batch carrying one is refused before it runs
SAFE_SOURCES = ["127.0.0.1:1", "127.0.0.1:notaport", "127.0.0.1:99999", "[::1]:1", "unix:/nonexistent/edgeheads",
                "", "ipv4:127.0.0.1:2"]  # PullBlock sources that stay on this host and resolve nothing


@dataclass(frozen=True)
class Method:
    service: str  # full name, e.g. edgeheads.v1.Worker
    name: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool
    daemon: str  # "worker", "controller", "headnode", or "any" (health and reflection)

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}/{self.name}"


def all_methods() -> list[Method]:
    """Every method of every service a daemon serves, read from the descriptors."""
    services = [(worker_pb2, "Worker", "worker"), (controller_pb2, "Controller", "controller"),
                (headnode_pb2, "Headnode", "headnode"), (health_pb2, "Health", "any"),
                (reflection_pb2, "ServerReflection", "any")]
    return [Method(s.full_name, m.name, message_factory.GetMessageClass(m.input_type), m.client_streaming,
                   m.server_streaming, daemon)
            for module, name, daemon in services for s in [module.DESCRIPTOR.services_by_name[name]]
            for m in s.methods]


@dataclass
class Env:
    """What the fuzzer knows of the cluster under test."""
    addresses: dict[str, str]  # daemon -> host:port: "controller", "headnode", "worker-0", ...
    relay_ports: dict[str, int]  # worker -> its relay TCP port
    shape: ModelShape
    transport: str  # the live relay transport, "tcp" or "grpc"
    weights_blob: bytes  # a valid safetensors blob of no real block
    placement: dict[str, str]  # block id -> the worker holding it (when the fuzzing began)
    fuzz_sessions: list[str] = field(default_factory=lambda: [f"fuzz-session-{i}" for i in range(8)])

    @property
    def workers(self) -> list[str]:
        return sorted(self.relay_ports)

    @property
    def real_blocks(self) -> set[str]:
        return {str(b) for b in self.shape.block_ids()}

    def is_real_block(self, text: str) -> bool:
        try:
            return str(BlockId.parse(text)) in self.real_blocks
        except ValueError:
            return False


@dataclass
class GrpcCase:
    label: str  # "Worker/RunCall", or "unknown-method"
    daemon: str  # a key of Env.addresses
    path: str
    client_streaming: bool
    server_streaming: bool
    messages: list[bytes]
    cancel_after_seconds: float | None = None  # the client gives up: mid-stream, or an endless stream
    hold_open: bool = False  # the request stream does not end (a client that vanishes mid-stream)
    how: str = ""  # near-valid, random, bytes


@dataclass
class RelayCase:
    label: str  # "relay/frames", "relay/random-bytes", ...
    daemon: str  # the worker
    data: bytes
    kinds: list[str]  # the frame kinds it carries, for the per-kind counts
    hold_open: bool = False  # no end of stream: the worker's hello timeout must close it


# ------------------------------------------------------------------ near-valid requests


def rand_block(env: Env, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(sorted(env.real_blocks))
    return rand_string(rng) if rng.random() < 0.5 else rng.choice(["attn(0,0)", "attn(1000,0)", "ffn(77)"])


def rand_op(env: Env, rng: random.Random, names: list[str]) -> worker_pb2.BlockOp:
    return worker_pb2.BlockOp(block_id=rand_block(env, rng), inputs=rng.sample(names, rng.randrange(0, len(names) + 1)),
                              output=rng.choice(["a", "h", "x1", "", names[0]]))


def rand_batch(env: Env, rng: random.Random) -> worker_pb2.ValueBatch:
    names = ["x0", "a", "h", JUNK, ""]
    return worker_pb2.ValueBatch(
        session=rng.choice(env.fuzz_sessions + ["", rand_string(rng)]),
        epoch=rng.choice([FUZZ_EPOCH, FUZZ_EPOCH, 1, 2, 3, FAR_EPOCH + rng.randrange(1000), 2**64 - 1]),
        position=rng.choice([0, 0, 1, 5, 2**63]), path_compute_seconds=rng.choice(FLOATS),
        reserve_tokens=rng.choice(RESERVE),
        values=[tensor_pb2.NamedTensor(name=rng.choice(names), tensor=rand_tensor(env, rng))
                for _ in range(rng.choice([0, 1, 1, 2]))])


def bad_shape_json(env: Env, rng: random.Random) -> str:
    """The model's shape as JSON with one field of a wrong type or value, missing or extra; or not JSON."""
    d = env.shape.to_dict()
    key = rng.choice(sorted(d))
    d[key] = rng.choice([None, "3", -1, 0, 1.5, [1], {"a": 1}, True, 2**70, math.nan, math.inf])
    missing = {k: v for k, v in d.items() if k != key}
    return rng.choice([json.dumps(d), json.dumps({**d, "extra": 1}), json.dumps(missing), "[]", "{", "1",
                       "[" * 100_000, rand_string(rng)])


def near_valid(method: Method, env: Env, rng: random.Random) -> list[Message] | None:
    """A request (list of messages) that a daemon might nearly accept, or None when this method
    has no such builder (then a random one is used)."""
    name, shape_json = method.name, json.dumps(env.shape.to_dict())
    if name == "RunCall":
        names = ["x", "x0", "h"]
        return [worker_pb2.CallRequest(
            session=rng.choice(env.fuzz_sessions + [""]), epoch=rng.choice([0, 1, 2**64 - 1]),
            position=rng.choice([0, 0, 0, 1, 3, 2**63]), reserve_tokens=rng.choice(RESERVE),
            inputs=[tensor_pb2.NamedTensor(name=rng.choice(names), tensor=rand_tensor(env, rng))
                    for _ in range(rng.choice([1, 1, 2, 0]))],
            ops=[rand_op(env, rng, names) for _ in range(rng.choice([1, 1, 2, 0, 5]))],
            return_values=rng.sample(["a", "h", "x", "nothing"], rng.randrange(0, 3)))
            for _ in range(rng.choice([1, 1, 2, 3]))]
    if name == "LoadBlock":
        blob = env.weights_blob if rng.random() < 0.7 else rng.randbytes(rng.choice([0, 10, 1000]))
        from edgeheads.common.wire import chunks, sha256_hex
        pieces = list(chunks(blob, rng.choice([len(blob) or 1, max(1, len(blob) // 3)])))
        if rng.random() < 0.3 and pieces:
            pieces = rng.sample(pieces, len(pieces))
        first = worker_pb2.LoadBlockChunk(
            block_id=rng.choice(["attn(1000,0)", "ffn(4096)", "proj(0)", rand_string(rng)]),
            model_shape_json=shape_json if rng.random() < 0.4 else bad_shape_json(env, rng),
            content_hash=rng.choice([sha256_hex(blob), "0" * 64, ""]))
        return [first] + [worker_pb2.LoadBlockChunk(chunk=p) for p in pieces] if rng.random() < 0.9 else [first]
    if name == "InstallProgram" and rng.random() < 0.5:  # one that installs where the block is
        block = rng.choice(sorted(b for b in env.placement if not b.startswith("proj")))
        calls = [worker_pb2.ProgramCall(ops=[worker_pb2.BlockOp(block_id=block, inputs=["x0"], output="a")],
                                        inputs=["x0"], routes=[worker_pb2.Route(
                                            destination=rng.choice(["", "nobody"] + env.workers), values=["a"])])]
        peers = {"nobody": rng.choice(SAFE_SOURCES)} if rng.random() < 0.5 else {}
        return [worker_pb2.InstallProgramRequest(epoch=FUZZ_EPOCH, calls=calls, transport=env.transport, peers=peers)]
    if name == "InstallProgram":
        calls = [worker_pb2.ProgramCall(
            ops=[rand_op(env, rng, ["x0", "a"]) for _ in range(rng.choice([1, 2, 0]))],
            inputs=rng.sample(["x0", "a", JUNK], rng.randrange(0, 3)),
            routes=[worker_pb2.Route(destination=rng.choice(env.workers + ["", "nobody"]), values=["a"])
                    for _ in range(rng.randrange(0, 3))]) for _ in range(rng.choice([1, 2, 0]))]
        return [worker_pb2.InstallProgramRequest(
            epoch=rng.choice([FUZZ_EPOCH, 1, 2, FAR_EPOCH]), calls=calls,
            transport=rng.choice([env.transport, "", "udp"]),
            peers={rng.choice(["nobody", "worker-0"]): rng.choice(SAFE_SOURCES)} if rng.random() < 0.5 else {})]
    if name in ("Drive", "Forward"):
        head = [worker_pb2.ValueBatch(epoch=rng.choice([FUZZ_EPOCH, 1, FAR_EPOCH + 7]))] if name == "Drive" else []
        return head + [rand_batch(env, rng) for _ in range(rng.choice([0, 1, 2, 4]))]
    if name == "ExportBlockState":
        return [worker_pb2.ExportBlockStateRequest(
            block_id=rand_block(env, rng), include_weights=rng.random() < 0.3,
            from_positions={rng.choice(env.fuzz_sessions + [""]): rng.choice(UNSIGNED)})]
    if name == "ExportBlockStates":
        return [worker_pb2.ExportBlockStatesRequest(
            blocks=[worker_pb2.ExportBlockStateRequest(block_id=rand_block(env, rng), include_weights=rng.random() < 0.3)
                    for _ in range(rng.choice([0, 1, 3]))], max_bytes_per_second=rng.choice(FLOATS))]
    if name == "PullBlocks":
        return [worker_pb2.PullBlocksRequest(
            blocks=[worker_pb2.PullItem(block_id=rng.choice(["attn(1000,0)", "ffn(-3)", "", rand_string(rng)]),
                                        content_hash=rng.choice(["0" * 64, ""])) for _ in range(rng.choice([0, 1, 2]))],
            source_address=rng.choice(SAFE_SOURCES + [env.addresses[w] for w in env.workers]
                                      + [env.addresses["headnode"]]),
            model_shape_json=shape_json, delta=rng.random() < 0.5,
            timeout_seconds=rng.choice([0.0, 0.5, 2.0, -1.0, math.nan, math.inf, 1e300]))]
    if name == "PullBlock":
        return [worker_pb2.PullBlockRequest(
            block_id=rng.choice(["attn(1000,0)", "ffn(-3)", "", rand_string(rng)]),
            source_address=rng.choice(SAFE_SOURCES + [env.addresses[w] for w in env.workers]
                                      + [env.addresses["headnode"]]),
            model_shape_json=shape_json, content_hash=rng.choice(["0" * 64, ""]), delta=rng.random() < 0.5,
            timeout_seconds=rng.choice([0.0, 0.5, 2.0, -1.0, math.nan, math.inf, 1e300]))]
    if name == "Generate":
        vocab = env.shape.vocab_size
        context = env.shape.max_positions  # prompts that leave no room, or too little, are refused
        ids = [rng.randrange(vocab) for _ in range(rng.choice([1, 3, 20, 20, context - 2, context + 1]))]
        if rng.random() < 0.4:
            ids[rng.randrange(len(ids))] = rng.choice([-1, vocab, 2**63 - 1, -2**63])
        req = headnode_pb2.GenerateRequest(
            max_new_tokens=rng.choice([0, 1, 2, 3]), temperature=rng.choice([0.0, 0.7, -1.0, math.nan, math.inf]),
            top_k=rng.choice([0, 5, vocab + 1, 2**32 - 1]), top_p=rng.choice([0.0, 0.9, 1.0, 1.5, -0.1, math.nan]))
        if rng.random() < 0.5:
            req.seed = rng.choice(SIGNED)
        if rng.random() < 0.7:
            req.prompt_token_ids.extend(ids)
        else:
            req.prompt = rand_string(rng)
            if rng.random() < 0.5:
                req.chat = rng.random() < 0.5
        return [req]
    if name == "SetModel":
        return [controller_pb2.SetModelRequest(model_shape_json=bad_shape_json(env, rng), model_name=rand_string(rng))]
    if name == "Telemetry":
        return [controller_pb2.TelemetryReport(name=rng.choice(["nobody", "", "worker-0"]),
                                               memory_available_bytes=rng.choice(UNSIGNED),
                                               memory_used_bytes=rng.choice(UNSIGNED),
                                               compute_flops=rng.choice(FLOATS))
                for _ in range(rng.choice([1, 2]))]
    if name == "HasWeights":
        return [worker_pb2.HasWeightsRequest(content_hashes=[rand_string(rng) for _ in range(rng.choice([1, 5, 500]))])]
    if name == "Probe":
        return [worker_pb2.ProbeRequest(payload=rng.randbytes(rng.choice([0, 100, 1 << 20])))]
    return None


# ------------------------------------------------------------------ defang: no request may name live objects

def strictly_valid_shape(text: str) -> bool:
    """Whether a SetModel would legitimately announce a new model (which re-plans the cluster):
    a JSON object of every field with its type, positive sizes, and heads that split into groups."""
    try:
        d = json.loads(text)
        fields = ModelShape.__dataclass_fields__
        if not isinstance(d, dict) or not set(fields) >= set(d):
            return False
        for name, f in fields.items():
            if name not in d:
                if f.default is dataclasses.MISSING:  # a required field
                    return False
                continue
            kind = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            value = d[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return False
            if f.type == "int" and value <= 0:
                return False
        return d["arch"] in ("gpt2", "llama") and d["n_heads"] % d["n_kv_heads"] == 0
    except (ValueError, TypeError, KeyError, RecursionError):
        return False


def might_be_live(epoch: int) -> bool:
    return FUZZ_EPOCH < epoch < FAR_EPOCH


def _defang_batch(batch: worker_pb2.ValueBatch, hello_drive: bool = False) -> None:
    """A drive hello (a batch without a session on a Drive stream) attaches to its epoch, so it
    must not name a live one; a batch with a session could run a live epoch's program, so one
    that might must carry a value no program reads."""
    if not might_be_live(batch.epoch):
        return
    if hello_drive or not batch.session:
        batch.epoch += FAR_EPOCH
    elif not any(v.name == JUNK for v in batch.values):
        batch.values.add(name=JUNK)


def defang(method: Method, messages: list[Message], env: Env, rng: random.Random) -> None:
    """Make ``messages`` (decoded requests of ``method``) unable to change the live generation's
    state by design, in place. Each rule names the legitimate effect it rules out."""
    fake = lambda text: f"attn({1000 + len(text)},0)"  # noqa: E731 - a block no model here has
    name = method.name
    for i, m in enumerate(messages):
        if name == "LoadBlock" and i == 0 and env.is_real_block(m.block_id):
            m.block_id = fake(m.block_id)  # would rebind a real block
        elif name == "UnloadBlocks":
            ids = [fake(b) if env.is_real_block(b) else b for b in m.block_ids]  # would unload a real block
            del m.block_ids[:]
            m.block_ids.extend(ids)
        elif name == "PullBlocks":
            for item in m.blocks:
                if env.is_real_block(item.block_id):
                    item.block_id = fake(item.block_id)  # would pull a real block's state onto this worker
            if m.source_address not in SAFE_SOURCES and m.source_address not in env.addresses.values():
                m.source_address = rng.choice(SAFE_SOURCES)  # loopback only, nothing to resolve
        elif name == "PullBlock":
            if env.is_real_block(m.block_id):
                m.block_id = fake(m.block_id)  # would pull a real block's state onto this worker
            if m.source_address not in SAFE_SOURCES and m.source_address not in env.addresses.values():
                m.source_address = rng.choice(SAFE_SOURCES)  # loopback only, nothing to resolve
        elif name == "InstallProgram":
            _defang_program(m, env)
        elif name == "Drive":
            _defang_batch(m, hello_drive=not m.session)
        elif name == "Forward":
            _defang_batch(m)
        elif name == "SetMemoryLimit":
            m.memory_limit_bytes = 0  # any other limit changes the budget the controller plans with
        elif name == "Register" and m.name and m.address:
            m.address = ""  # a new member makes the controller re-plan onto it
        elif name == "Telemetry" and m.name in env.workers:
            m.name = JUNK + m.name  # a report would stand for the real worker's, and its end remove it
        elif name == "SetModel" and strictly_valid_shape(m.model_shape_json):
            m.model_shape_json = m.model_shape_json[:-1]  # a valid shape announces a new model
        elif name == "Generate":  # valid generations are fine, but bounded: admission is not what this tests
            m.max_new_tokens = min(max(m.max_new_tokens, 1), 4)
            # a long prompt within the context only on a tiny model (a cheap prefill); past it, it is refused
            if 64 < len(m.prompt_token_ids) <= env.shape.max_positions and env.shape.max_positions > 512:
                del m.prompt_token_ids[64:]
            m.prompt = m.prompt[:500]


def _defang_program(m: worker_pb2.InstallProgramRequest, env: Env) -> None:
    """A program that installs evicts older epochs' (4 are kept) and updates the worker's peers and
    transport, so one that might install goes to FUZZ_EPOCH (never live, the oldest: evicted
    first), keeps the live transport, names no real worker as a peer and no peer off this host."""
    sure_to_fail = (m.transport not in ("", "tcp", "grpc") or not m.calls or any(not c.ops for c in m.calls)
                    or any(not env.is_real_block(op.block_id) for c in m.calls for op in c.ops))
    if sure_to_fail:
        return
    m.epoch, m.transport = FUZZ_EPOCH, env.transport
    for worker in [w for w in m.peers if w in env.workers]:
        m.peers[JUNK + worker] = m.peers.pop(worker)
    for peer, address in m.peers.items():  # the worker dials (and probes) its peers: loopback only
        if address not in SAFE_SOURCES:
            m.peers[peer] = SAFE_SOURCES[len(address) % len(SAFE_SOURCES)]


# ------------------------------------------------------------------ cases

def grpc_case(method: Method, env: Env, rng: random.Random) -> GrpcCase:
    """One request of ``method``: near-valid, random, or broken bytes, defanged."""
    roll = rng.random()
    msgs = near_valid(method, env, rng) if roll < 0.45 else None
    how = "near-valid"
    if msgs is None:
        how = "random"
        n = 1 if not method.client_streaming else rng.choice([0, 1, 2, 3])
        msgs = [random_message(method.request, rng, env) for _ in range(n)]
    if msgs and rng.random() < 0.3:
        mutate(rng.choice(msgs), rng, env)
    data = [m.SerializeToString() for m in msgs]
    if data and rng.random() < 0.25:
        how = "bytes"
        i = rng.randrange(len(data))
        data[i] = break_bytes(data[i], rng)
    data = [_defanged(method, d, env, rng) for d in data]
    daemon = _daemon_for(method, data, env, rng)
    if data and rng.random() < 0.003:  # over the daemons' 64 MiB message limit: refused unread
        how, data[0] = "oversized", b"\x0a" + _varint((64 << 20) + 1) + bytes((64 << 20) + 1)
    case = GrpcCase(method.label, daemon, method.path, method.client_streaming, method.server_streaming, data, how=how)
    endless = method.name in ("Watch", "WatchPlacement")  # serve until the client goes: it cancels
    if endless or (method.server_streaming and rng.random() < 0.1):
        case.cancel_after_seconds = rng.choice([0.05, 0.2])
    if method.client_streaming and rng.random() < 0.1:  # a client that vanishes mid-stream
        case.hold_open, case.cancel_after_seconds = True, rng.choice([0.05, 0.2])
    if method.name == "Generate" and rng.random() < 0.2:  # a long generation whose client goes away
        case.cancel_after_seconds = 0.3
    return case


def _defanged(method: Method, data: bytes, env: Env, rng: random.Random) -> bytes:
    """``data`` as sent: unchanged unless it decodes to a request that ``defang`` changes."""
    try:
        msg = method.request.FromString(data)
    except DecodeError:
        return data  # the daemon cannot decode it either
    before = msg.SerializeToString()
    defang(method, [msg], env, rng)
    after = msg.SerializeToString()
    return data if after == before else after


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _daemon_for(method: Method, data: list[bytes], env: Env, rng: random.Random) -> str:
    if method.daemon == "any" or rng.random() < 0.02:  # now and then at a daemon that does not serve it
        return rng.choice(sorted(env.addresses))
    if method.daemon != "worker":
        return method.daemon
    held = [w for b, w in env.placement.items() if any(b.encode() in d for d in data)]
    return held[0] if held and rng.random() < 0.7 else rng.choice(env.workers)  # mostly where a block named is


def unknown_method_case(env: Env, rng: random.Random) -> GrpcCase:
    path = rng.choice(["/edgeheads.v1.Worker/Nope", "/edgeheads.v1.Nope/RunCall", "/x/y", "/edgeheads.v1.Worker/",
                       "/grpc.health.v1.Health/Nope"])
    return GrpcCase("unknown-method", rng.choice(sorted(env.addresses)), path, rng.random() < 0.5,
                    rng.random() < 0.5, [rand_bytes(rng)], how="bytes")
