"""Mutual TLS and the cluster token with real processes on 127.0.0.1 (LocalCluster): a secured
cluster generates exactly what a plaintext one does, and whoever lacks the CA's certificate or
the token is refused, with the refusal in the refusing daemon's log."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeheads.common.certs import make_ca, make_node_cert, write_bundle
from edgeheads.common.channels import open_sync_channel
from edgeheads.common.relay_wire import Kind, encode_hello, read_frame
from edgeheads.common.security import Security, SecuritySettings, load_security
from edgeheads.headnode import Client
from edgeheads.headnode.cli import main
from edgeheads.headnode.client import ClientError
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

TOKEN = "test-cluster-token-5f1c0a9e2b7d4e66"
PROMPT = "Edge devices"
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """cluster/: the CA's node and client bundles for 127.0.0.1; stranger/: another CA's;
    impostor/: the stranger's node certificate, trusting both CAs."""
    out = tmp_path_factory.mktemp("pki")
    for ca_name, names in (("cluster", ("node", "client")), ("stranger", ("node",))):
        ca_key, ca_cert = make_ca(f"{ca_name} CA", 30)
        for name in names:
            key, cert = make_node_cert(ca_key, ca_cert, name, ["127.0.0.1"], 30)
            write_bundle(out / ca_name, name, key, cert, ca_cert_pem=ca_cert)
    both = (out / "cluster" / "ca.crt").read_bytes() + (out / "stranger" / "ca.crt").read_bytes()
    write_bundle(out / "impostor", "node", (out / "stranger" / "node.key").read_bytes(),
                 (out / "stranger" / "node.crt").read_bytes(), ca_cert_pem=both)
    return out


def security_env(tls_dir: Path, name: str = "node", token: str | None = TOKEN) -> dict[str, str]:
    env = {"EDGEHEADS_SECURITY__TLS_DIR": str(tls_dir), "EDGEHEADS_SECURITY__TLS_NAME": name}
    if token:
        env["EDGEHEADS_SECURITY__TOKEN"] = token
    return env


def client_security(pki: Path, token: str | None = TOKEN) -> Security:
    return load_security(SecuritySettings(tls_dir=pki / "cluster", tls_name="client", token=token))


@pytest.fixture(scope="module")
def tiny_model(save_tiny_model) -> Path:
    return save_tiny_model(TINY_CONFIGS["gpt2"], "gpt2-security", seed=11)


@pytest.fixture(scope="module")
def plaintext_tokens(tiny_model) -> list[int]:
    """The reference: the same model on a plaintext cluster."""
    with LocalCluster(str(tiny_model), workers=3, progress=False) as cluster, Client(cluster.address) as client:
        return client.generate_full(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


@pytest.fixture(scope="module")
def secured(tiny_model, pki):
    with LocalCluster(str(tiny_model), workers=3, progress=False, extra_env=security_env(pki / "cluster")) as cluster:
        yield cluster


def wait_for_log(cluster: LocalCluster, name: str, text: str, timeout: float = 20) -> str:
    """The log line of daemon ``name`` that holds ``text`` (polling: the daemon writes it on its own)."""
    deadline = time.monotonic() + timeout
    while True:
        path = cluster.dir / f"{name}.log"
        lines = [line for line in path.read_text(errors="replace").splitlines() if text in line]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, f"{text!r} not in {name}'s log:\n{cluster.log_tail(name)}"
        time.sleep(0.1)


def test_a_generation_over_tls_and_token_is_identical_to_plaintext(secured, pki, plaintext_tokens):
    security = client_security(pki)
    with Client(secured.address, security=security) as client:
        got = client.generate_full(PROMPT, max_new_tokens=NEW_TOKENS)
        status = client.status()
    assert got.token_ids == plaintext_tokens
    assert status["dataflow"] == "relay/tcp"
    frames = 0
    for worker in status["workers"]:  # the activations took the relay ports (TLS ones: see below)
        with open_sync_channel(secured.addresses[worker], security=security) as channel:
            frames += worker_pb2_grpc.WorkerStub(channel).GetTelemetry(
                worker_pb2.TelemetryRequest(), timeout=10).relay_frames_received
    assert frames > 0


@pytest.mark.parametrize("dataflow", ["relay/grpc", "head"])
def test_the_other_dataflows_are_identical_over_tls_and_token_too(tiny_model, pki, plaintext_tokens, dataflow):
    """Their activations travel on gRPC streams, written message by message through the token's
    client interceptor."""
    flow, _, transport = dataflow.partition("/")
    env = {**security_env(pki / "cluster"), "EDGEHEADS_HEADNODE__DATAFLOW": flow,
           "EDGEHEADS_HEADNODE__RELAY_TRANSPORT": transport or "tcp"}
    with LocalCluster(str(tiny_model), workers=3, progress=False, extra_env=env) as cluster, \
            Client(cluster.address, security=client_security(pki)) as client:
        got = client.generate_full(PROMPT, max_new_tokens=NEW_TOKENS)
        assert client.status()["dataflow"] == dataflow
    assert got.token_ids == plaintext_tokens


def test_a_client_without_the_token_is_refused_and_logged(secured, pki):
    with Client(secured.address, security=client_security(pki, token=None)) as client:
        with pytest.raises(ClientError) as err:
            client.generate(PROMPT, max_new_tokens=4)
    assert err.value.code == "UNAUTHENTICATED" and "no cluster token" in str(err.value)
    line = wait_for_log(secured, "headnode", "refused an RPC to /edgeheads.v1.Headnode/Generate")
    assert "from ipv4:127.0.0.1:" in line and line.endswith("no cluster token")
    assert TOKEN not in (secured.dir / "headnode.log").read_text()


@pytest.mark.parametrize("daemon", ["headnode", "controller", "worker-0"])
def test_a_plaintext_client_cannot_reach_a_tls_daemon(secured, daemon):
    with open_sync_channel(secured.addresses[daemon], security=Security(None, TOKEN)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def _relay_hello(address: str, port: int, context: ssl.SSLContext | None, token: str | None) -> list:
    """Open a forward link to the relay port by hand; the (kind, error code) frames it gets back."""
    host = address.rsplit(":", 1)[0]
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                       server_hostname=host if context else None)
        writer.write(encode_hello(Kind.HELLO_FORWARD, 1, token))
        frames = []
        while (frame := await asyncio.wait_for(read_frame(reader, 1 << 20), 20)) is not None:
            frames.append((frame[0], worker_pb2.DriveReply.FromString(frame[1]).error_code))
        writer.close()
        return frames
    except (OSError, asyncio.IncompleteReadError) as err:
        return [type(err).__name__]


def test_bad_relay_hellos_are_refused_and_logged_while_a_generation_completes(secured, pki, plaintext_tokens):
    security = client_security(pki)
    worker = "worker-1"
    with open_sync_channel(secured.addresses[worker], security=security) as channel:
        port = worker_pb2_grpc.WorkerStub(channel).RelayEndpoint(worker_pb2.RelayEndpointRequest(), timeout=10).port
    result: dict[str, object] = {}
    started = threading.Event()

    def generate() -> None:
        with Client(secured.address, security=security) as client:
            ids = []
            for event in client._events(PROMPT, NEW_TOKENS, 0.0, 0, 1.0, None, None):
                started.set()
                if not event.done:
                    ids.append(event.token_id)
            result["tokens"] = ids
    thread = threading.Thread(target=generate)
    thread.start()
    assert started.wait(120)
    address = secured.addresses[worker]
    plaintext = asyncio.run(_relay_hello(address, port, None, TOKEN))
    wrong_token = asyncio.run(_relay_hello(address, port, security.ssl_contexts[1], "x" * 32))
    thread.join(120)
    assert result.get("tokens") == plaintext_tokens  # the worker served the generation throughout
    assert plaintext in ([], ["ConnectionResetError"]), plaintext  # no frame: it is not a TLS peer
    assert wrong_token == [(Kind.ERROR, "UNAUTHENTICATED")], wrong_token
    line = wait_for_log(secured, worker, "refused a relay connection to worker worker-1")
    assert "from 127.0.0.1:" in line and "not a TLS client" in line, line
    assert wait_for_log(secured, worker, "refused a relay hello").endswith("a wrong cluster token")


def start_rogue_worker(cluster: LocalCluster, tls_dir: Path, log_path: Path) -> subprocess.Popen:
    """A worker of ``tls_dir``'s certificate (with the cluster's token) dialing the controller."""
    env = {**cluster.env, **security_env(tls_dir)}
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([*cluster.cli_command, "worker", "--listen", "127.0.0.1:0", "--controller",
                                 cluster.addresses["controller"], "--name", "rogue", "--threads", "1"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)


@pytest.mark.parametrize("who", ["impostor", "stranger"])
def test_a_worker_with_another_cas_certificate_cannot_join(secured, pki, tmp_path, who):
    """impostor: trusts the cluster's CA too and presents its own certificate, which the
    controller refuses in the handshake (gRPC logs that in the controller's log). stranger:
    trusts only its CA, so it breaks off the handshake itself. Neither is ever listed."""
    log_path = tmp_path / "rogue.log"
    rogue = start_rogue_worker(secured, pki / who, log_path)
    try:
        deadline = time.monotonic() + 60
        while "retrying" not in log_path.read_text(errors="replace"):  # its first attempt failed
            assert rogue.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        with open_sync_channel(secured.addresses["controller"], security=client_security(pki)) as channel:
            workers = controller_pb2_grpc.ControllerStub(channel).ListWorkers(
                controller_pb2.ListWorkersRequest(), timeout=10).workers
    finally:
        rogue.terminate()
        rogue.wait(30)
    assert sorted(w.name for w in workers) == ["worker-0", "worker-1", "worker-2"]
    rogue_log = log_path.read_text()
    assert f"worker rogue: controller {secured.addresses['controller']}: UNAVAILABLE" in rogue_log, rogue_log
    if who == "stranger":  # the worker says why
        assert "CERTIFICATE_VERIFY_FAILED" in rogue_log, rogue_log
    else:
        line = wait_for_log(secured, "controller", "CERTIFICATE_VERIFY_FAILED")
        assert "Handshake failed" in line, line


def test_health_status_and_generate_commands_read_the_same_settings(secured, pki, tmp_path, monkeypatch, capsys):
    config = tmp_path / "client.yaml"
    config.write_text(f"security:\n  tls_dir: {pki / 'cluster'}\n  tls_name: client\n  token_file: {tmp_path / 't'}\n")
    (tmp_path / "t").write_text(TOKEN + "\n")
    headnode, controller = secured.addresses["headnode"], secured.addresses["controller"]
    assert main(["health", "--config", str(config), headnode]) == 0
    assert capsys.readouterr().out.strip() == f"{headnode}: SERVING"
    assert main(["status", "--config", str(config), "--controller", controller, "--headnode", headnode, "--json"]) == 0
    assert '"worker-0"' in capsys.readouterr().out
    assert main(["generate", PROMPT, "--cluster", headnode, "--config", str(config), "--max-new-tokens", "3",
                 "--json"]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    for name, value in security_env(pki / "cluster", "client").items():  # the same through the environment
        monkeypatch.setenv(name, value)
    assert main(["health", controller]) == 0
    capsys.readouterr()
    monkeypatch.delenv("EDGEHEADS_SECURITY__TOKEN")
    assert main(["health", controller]) == 1
    assert "refused (no cluster token" in capsys.readouterr().err
