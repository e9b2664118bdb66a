"""Run fuzz cases (fuzz_cases.py, fuzz_relay.py) against a LocalCluster while a real generation
runs on it, and tally what came back. Used by tests/test_fuzz.py and benchmarks/fuzz.py.

- Every gRPC request goes with identity serializers and a deadline; its outcome is the status
  code it ended with, CANCELLED_BY_CLIENT when the case itself gave up (an endless stream, a
  client that vanishes mid-stream), or DEADLINE_EXCEEDED when no answer came in time.
- Every relay connection's outcome is the first error code the worker sent, OK when it closed
  without one, RESET when it reset the connection, TIMEOUT when it was still open at the deadline.
- Meanwhile one thread generates the same prompt again and again through the head node; each
  generation must equal the in-process reference (headnode.local.LocalGenerator).
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeheads.common.spec import ModelShape
from edgeheads.common.wire import weights_to_blob
from edgeheads.headnode.generation import encode_prompt
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc, worker_pb2, worker_pb2_grpc
from fuzz_cases import Env, GrpcCase, all_methods, grpc_case, unknown_method_case
from fuzz_relay import exchange, relay_case, silent_cases

CALL_TIMEOUT = 15.0  # seconds an answer may take; longer is a hang
RELAY_TIMEOUT = 20.0  # above the worker's 10 s hello timeout
NO_ANSWER = "NO_ANSWER"  # nothing before the deadline: a hang
BAD = ("UNKNOWN", "INTERNAL", NO_ANSWER, "GARBLED", "REFUSED")  # never an acceptable answer
PROMPT = "in flight"


@dataclass
class Report:
    seed: int
    sent: int = 0
    answered: int = 0  # a status (or a relay answer) before the deadline
    by_label: collections.Counter = field(default_factory=collections.Counter)
    by_outcome: collections.Counter = field(default_factory=collections.Counter)
    by_label_outcome: collections.Counter = field(default_factory=collections.Counter)  # (label, outcome)
    frame_kinds: collections.Counter = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)  # label, outcome and details of every BAD answer
    seconds: float = 0.0
    generations: int = 0  # concurrent generations completed during the fuzzing
    identical: int = 0  # of them, equal to the reference
    generation_errors: list[str] = field(default_factory=list)
    daemons_alive: dict[str, bool] = field(default_factory=dict)
    daemons_serving: dict[str, bool] = field(default_factory=dict)

    def record(self, label: str, outcome: str, detail: str = "") -> None:
        self.sent += 1
        self.answered += outcome != NO_ANSWER
        self.by_label[label] += 1
        self.by_outcome[outcome] += 1
        self.by_label_outcome[label, outcome] += 1
        if outcome in BAD:
            self.bad.append(f"{label}: {outcome}: {detail[:300]}")

    def outcomes_per_label(self) -> str:
        per: dict[str, list[str]] = collections.defaultdict(list)
        for (label, outcome), n in sorted(self.by_label_outcome.items(), key=lambda kv: (kv[0][0], -kv[1])):
            per[label].append(f"{outcome} {n}")
        return "\n".join(f"  {label}: {', '.join(items)}" for label, items in sorted(per.items()))

    def summary(self) -> str:
        lines = [f"seed {self.seed}: {self.sent} requests, {self.answered} answered in {self.seconds:.1f} s "
                 f"({self.sent / max(self.seconds, 1e-9):.0f}/s)",
                 "outcomes: " + ", ".join(f"{k} {v}" for k, v in self.by_outcome.most_common()),
                 "per RPC / relay case: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_label.items())),
                 "relay frames sent by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.frame_kinds.items())),
                 f"concurrent generations: {self.identical} of {self.generations} identical to the reference"
                 + (f"; errors: {self.generation_errors}" if self.generation_errors else ""),
                 f"daemons alive: {self.daemons_alive}", f"daemons serving health: {self.daemons_serving}"]
        if self.bad:
            lines.append(f"{len(self.bad)} bad answers:\n  " + "\n  ".join(self.bad[:30]))
        return "\n".join(lines)


class GenerationLoop(threading.Thread):
    """Generates the same prompt through the head node until stopped; counts the identical ones."""

    def __init__(self, address: str, prompt_ids: list[int], expected: list[int]) -> None:
        super().__init__(daemon=True)
        self.address, self.prompt_ids, self.expected = address, prompt_ids, expected
        self.stop = threading.Event()
        self.started_tokens = threading.Event()
        self.runs: list[list[int]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = headnode_pb2_grpc.HeadnodeStub(channel)
            while not self.stop.is_set():
                tokens = []
                try:
                    for event in stub.Generate(headnode_pb2.GenerateRequest(
                            prompt_token_ids=self.prompt_ids, max_new_tokens=len(self.expected)), timeout=300):
                        if not event.done:
                            tokens.append(event.token_id)
                            self.started_tokens.set()
                except grpc.RpcError as err:
                    self.errors.append(f"{err.code().name}: {err.details()}")
                    self.started_tokens.set()
                    time.sleep(0.5)
                    continue
                self.runs.append(tokens)


def cluster_env(cluster, model) -> tuple[Env, int]:
    """The fuzzer's view of a started LocalCluster, and the live epoch."""
    with grpc.insecure_channel(cluster.address) as ch:
        status = headnode_pb2_grpc.HeadnodeStub(ch).Status(headnode_pb2.StatusRequest(), timeout=10)
    workers = sorted(n for n in cluster.addresses if n.startswith("worker-"))
    ports = {}
    for w in workers:
        with grpc.insecure_channel(cluster.addresses[w]) as ch:
            ports[w] = worker_pb2_grpc.WorkerStub(ch).RelayEndpoint(worker_pb2.RelayEndpointRequest(), timeout=10).port
    shape = model.parts.shape
    assert isinstance(shape, ModelShape) and status.epoch >= 1, status  # epoch 0 is the fuzzer's (fuzz_cases)
    transport = status.dataflow.split("/")[1] if "/" in status.dataflow else "grpc"
    blob = weights_to_blob({"w": torch.arange(6, dtype=torch.float32)})
    placement = json.loads(status.placement_json)
    return Env(dict(cluster.addresses), ports, shape, transport, blob, placement), status.epoch


def send_grpc(channels: dict[str, grpc.Channel], case: GrpcCase) -> tuple[str, str]:
    """(outcome, details) of one gRPC case."""
    channel = channels[case.daemon]
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    callable_ = kind[(case.client_streaming, case.server_streaming)](case.path)
    release = threading.Event()

    def requests():
        yield from case.messages
        if case.hold_open:
            release.wait(CALL_TIMEOUT)
    request = requests() if case.client_streaming else (case.messages[0] if case.messages else b"")
    cancelled = threading.Event()
    start = time.monotonic()
    try:
        if case.server_streaming or case.cancel_after_seconds:
            call = (callable_(request, timeout=CALL_TIMEOUT) if case.server_streaming
                    else callable_.future(request, timeout=CALL_TIMEOUT))
            timer = None
            if case.cancel_after_seconds:
                def cancel():
                    cancelled.set()
                    call.cancel()
                timer = threading.Timer(case.cancel_after_seconds, cancel)
                timer.start()
            try:
                if case.server_streaming:
                    for _ in call:
                        pass
                else:
                    call.result()
            finally:
                if timer is not None:
                    timer.cancel()
        else:
            callable_(request, timeout=CALL_TIMEOUT)
        return "OK", ""
    except grpc.FutureCancelledError:
        return "CANCELLED_BY_CLIENT", ""
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and cancelled.is_set():
            return "CANCELLED_BY_CLIENT", ""
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start >= CALL_TIMEOUT * 0.95:
            return NO_ANSWER, err.details() or ""  # our deadline, not a daemon's answer
        return err.code().name, err.details() or ""
    finally:
        release.set()


def check_daemons(cluster, report: Report) -> None:
    for name, proc in cluster.procs.items():
        report.daemons_alive[name] = proc.poll() is None
        try:
            with grpc.insecure_channel(cluster.addresses[name]) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            report.daemons_serving[name] = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            report.daemons_serving[name] = False


def run_fuzz(cluster, model, requests: int, seed: int, new_tokens: int = 48, log=print) -> Report:
    """``requests`` fuzz requests (gRPC calls and relay connections) at a started LocalCluster
    while it generates; then the daemons are checked."""
    env, _ = cluster_env(cluster, model)
    prompt_ids = encode_prompt(model.tokenizer, PROMPT, None)  # as LocalGenerator encodes it
    expected = LocalGenerator(model).generate_ids(prompt_ids, SamplingParams(max_new_tokens=new_tokens)).token_ids
    report, rng = Report(seed), random.Random(seed)
    methods = all_methods()
    loop = GenerationLoop(cluster.address, prompt_ids, expected)
    loop.start()
    assert loop.started_tokens.wait(300), "the concurrent generation never started"
    channels = {name: grpc.insecure_channel(address) for name, address in env.addresses.items()}
    host = env.addresses[env.workers[0]].rsplit(":", 1)[0]
    silent = silent_cases(env)
    start = time.monotonic()
    with ThreadPoolExecutor(len(silent)) as pool:
        held = [(c, pool.submit(exchange, host, env.relay_ports[c.daemon], c, RELAY_TIMEOUT)) for c in silent]
        for i in range(requests - len(silent)):
            roll = rng.random()
            if roll < 0.35:
                case = relay_case(env, rng)
                outcome = exchange(host, env.relay_ports[case.daemon], case, RELAY_TIMEOUT)
                report.frame_kinds.update(case.kinds)
                report.record(case.label, outcome.key, f"{outcome}")
            else:
                case = unknown_method_case(env, rng) if roll < 0.37 else grpc_case(rng.choice(methods), env, rng)
                outcome, details = send_grpc(channels, case)
                report.record(case.label, outcome, f"{case.how} {details}")
            if log and (i + 1) % 1000 == 0:
                log(f"  {i + 1} requests, {time.monotonic() - start:.0f} s")
        for case, future in held:
            outcome = future.result()
            report.record(case.label, outcome.key, f"{outcome}")
    report.seconds = time.monotonic() - start
    loop.stop.set()
    loop.join(timeout=300)
    report.generations, report.generation_errors = len(loop.runs), loop.errors
    report.identical = sum(run == expected for run in loop.runs)
    _drop_fuzz_sessions(channels, env)
    for ch in channels.values():
        ch.close()
    check_daemons(cluster, report)
    return report


def _drop_fuzz_sessions(channels: dict[str, grpc.Channel], env: Env) -> None:
    """The fuzz sessions' caches (a RunCall at position 0 makes one) are not the test's to keep."""
    for w in env.workers:
        stub = worker_pb2_grpc.WorkerStub(channels[w])
        for s in env.fuzz_sessions:
            stub.DropSession(worker_pb2.DropSessionRequest(session=s), timeout=10)



