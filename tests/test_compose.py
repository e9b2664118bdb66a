"""The compose cluster of deploy/compose.yaml, driven from the host as a user would drive it.

A controller, a head node and three workers limited like a Pi 4, a Pi 5 and a Jetson-class board
run as containers. From the host: every service becomes healthy, each worker reports its own
container's memory limit, `edgeheads generate --cluster`, the Python client and the official
``openai`` package (streaming and not) give the greedy tokens of `edgeheads generate --local`,
`--scale worker=2` adds a worker with its own address, and `down` leaves no container, network or
volume behind.

Needs a Docker engine, Compose (``docker compose`` v2 or ``docker-compose`` 1.29; set
EDGEHEADS_TEST_COMPOSE to choose) and the images deploy/build-image.sh builds (EDGEHEADS_IMAGE,
EDGEHEADS_HEADNODE_IMAGE, default edgeheads:worker and edgeheads:headnode). .ci/run builds them;
locally the test skips without them and fails in CI. The model comes from the host's cache
(mounted at /cache), so the containers need no network.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from edgeheads.headnode.client import Client
from edgeheads.headnode.dtype_choice import default_dtype
from edgeheads.headnode.model_cache import cache_dir
from edgeheads.v1 import controller_pb2, controller_pb2_grpc

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
PROMPT = "The three most useful things to know about edge computing are"
MAX_NEW_TOKENS = 24
GIB = 1 << 30
# the mem_limit of each worker service in deploy/compose.yaml; the scalable one has no fixed name
LIMITS = {"pi5": 2 * GIB, "jetson": 4 * GIB}
SCALABLE_LIMIT = 1 * GIB
HEALTHY_WITHIN_SECONDS = 600


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) where the plugin is there, else ``docker-compose`` (1.29)."""
    if os.environ.get("EDGEHEADS_TEST_COMPOSE"):
        return shlex.split(os.environ["EDGEHEADS_TEST_COMPOSE"])
    if shutil.which("docker") and _ok("docker", "compose", "version"):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Compose:
    command: list[str]
    project: str
    env: dict[str, str]
    grpc: str
    http: str
    controller: str
    healthy_after_seconds: float = 0.0

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.command, "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def containers(self) -> list[str]:
        return self.run("ps", "-q").stdout.split()

    def health(self) -> dict[str, str]:
        """container name -> health status (or the state when it has stopped)."""
        out = {}
        for cid in self.containers():
            name, state, health = subprocess.run(
                ["docker", "inspect", "-f", "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}"
                 "{{else}}none{{end}}", cid], capture_output=True, text=True, check=True).stdout.split()
            out[name.lstrip("/")] = health if state == "running" else state
        return out

    def wait_healthy(self, services: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            health = self.health()
            if len(health) == services and all(h == "healthy" for h in health.values()):
                return
            broken = {n: h for n, h in health.items() if h in ("unhealthy", "exited", "dead")}
            if broken:
                break
            time.sleep(2)
        logs = self.run("logs", "--tail", "40", check=False).stdout
        pytest.fail(f"services not healthy: {health}\n{logs[-6000:]}")

    def resources(self) -> dict[str, list[str]]:
        """What Docker still holds under this project's label."""
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: subprocess.run(["docker", *cmd, "--filter", label], capture_output=True, text=True,
                                     check=True).stdout.split()
                for kind, cmd in (("containers", ["ps", "-aq"]), ("networks", ["network", "ls", "-q"]),
                                  ("volumes", ["volume", "ls", "-q"]))}


def list_workers(controller: str) -> list[controller_pb2.WorkerInfo]:
    with grpc.insecure_channel(controller) as channel:
        return list(controller_pb2_grpc.ControllerStub(channel).ListWorkers(
            controller_pb2.ListWorkersRequest(), timeout=10).workers)


def edgeheads(*args: str) -> dict:
    """Run the edgeheads CLI on the host with --json; its result."""
    proc = subprocess.run([sys.executable, "-m", "edgeheads.headnode.cli", "generate", *args, "--json",
                           "--max-new-tokens", str(MAX_NEW_TOKENS)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def compose(require_capability, smollm2_gguf):
    command = compose_command()
    require_capability("Docker Compose (docker compose or docker-compose)", command is not None)
    require_capability("a running Docker engine", _ok("docker", "info"))
    images = (os.environ.get("EDGEHEADS_IMAGE", "edgeheads:worker"),
              os.environ.get("EDGEHEADS_HEADNODE_IMAGE", "edgeheads:headnode"))
    for image in images:
        require_capability(f"the image {image} (deploy/build-image.sh)", _ok("docker", "image", "inspect", image))
    ports = {name: free_port() for name in ("grpc", "http", "controller")}
    # COMPOSE_HTTP_TIMEOUT: with the vfs storage driver, removing a container copies and deletes
    # its whole filesystem, which on a loaded machine outlasts docker-compose's default 60 s
    env = {**os.environ, "COMPOSE_HTTP_TIMEOUT": "300", "EDGEHEADS_CACHE": str(cache_dir()), "EDGEHEADS_IMAGE": images[0],
           "EDGEHEADS_HEADNODE_IMAGE": images[1], "EDGEHEADS_GRPC_PORT": str(ports["grpc"]),
           "EDGEHEADS_HTTP_PORT": str(ports["http"]), "EDGEHEADS_CONTROLLER_PORT": str(ports["controller"]),
           "EDGEHEADS_DTYPE": default_dtype()}  # the format `generate --local` here runs
    cluster = Compose(command, f"edgeheadstest{os.getpid()}", env, f"127.0.0.1:{ports['grpc']}",
                      f"http://127.0.0.1:{ports['http']}/v1", f"127.0.0.1:{ports['controller']}")
    start = time.monotonic()
    try:
        cluster.run("up", "-d")
        cluster.wait_healthy(5, HEALTHY_WITHIN_SECONDS)
        cluster.healthy_after_seconds = time.monotonic() - start
        print(f"\ncompose: all 5 services healthy {cluster.healthy_after_seconds:.0f} s after `up -d`")
        yield cluster
    finally:
        cluster.run("down", "-v", "--remove-orphans", "--timeout", "20", check=False)


@pytest.fixture(scope="module")
def local_raw():
    """`edgeheads generate --local` on the host: the reference."""
    return edgeheads(PROMPT, "--local", "--raw")


def test_each_worker_reports_its_own_containers_memory_limit(compose):
    workers = list_workers(compose.controller)
    assert len(workers) == 3
    for w in workers:
        assert w.memory_limit_source == "cgroup", w
        assert w.memory_limit_bytes == LIMITS.get(w.name, SCALABLE_LIMIT), w
    # containers advertise their own addresses on the compose network, not loopback
    hosts = {w.address.rsplit(":", 1)[0] for w in workers}
    assert len(hosts) == 3 and not any(h.startswith("127.") for h in hosts)


def test_the_cli_and_the_python_client_match_generate_local(compose, local_raw):
    remote = edgeheads(PROMPT, "--cluster", compose.grpc, "--raw")
    assert remote["token_ids"] == local_raw["token_ids"] and len(local_raw["token_ids"]) == MAX_NEW_TOKENS
    with Client(compose.grpc) as client:
        got = client.generate_full(PROMPT, MAX_NEW_TOKENS, chat=False)
    assert got.token_ids == local_raw["token_ids"] and got.text == local_raw["text"]
    with grpc.insecure_channel(compose.controller) as channel:  # compose names no policy: the default ran
        status = controller_pb2_grpc.ControllerStub(channel).Status(controller_pb2.ControllerStatusRequest(),
                                                                    timeout=10)
    assert status.policy == "resource-aware" and status.epoch >= 1


def test_the_openai_package_streaming_and_not(compose, local_raw, require_capability):
    try:
        import openai
    except ImportError:
        openai = None
    require_capability("the openai package (the test extra)", openai is not None)
    client = openai.OpenAI(base_url=compose.http, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert done.choices[0].text == local_raw["text"]
    assert done.usage.completion_tokens == MAX_NEW_TOKENS
    parts = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_NEW_TOKENS, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in parts) == local_raw["text"]
    question = "What is a Raspberry Pi?"
    local_chat = edgeheads(question, "--local", "--chat")
    messages = [{"role": "user", "content": question}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert chat.choices[0].message.content == local_chat["text"]
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW_TOKENS,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == local_chat["text"]


def test_scaling_adds_a_worker_with_its_own_address(compose, local_raw):
    before = {w.name for w in list_workers(compose.controller)}
    compose.run("up", "-d", "--no-recreate", "--scale", "worker=2")
    compose.wait_healthy(6, HEALTHY_WITHIN_SECONDS)
    deadline = time.monotonic() + 120
    while len(workers := list_workers(compose.controller)) < 4 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(workers) == 4, workers
    new = [w for w in workers if w.name not in before]
    assert len(new) == 1 and new[0].memory_limit_bytes == SCALABLE_LIMIT
    assert len({w.address for w in workers}) == 4
    with Client(compose.grpc) as client:  # the controller may now place blocks on it; the tokens do not change
        assert client.generate_full(PROMPT, MAX_NEW_TOKENS, chat=False).token_ids == local_raw["token_ids"]


def test_down_leaves_no_container_network_or_volume(compose):
    assert any(compose.resources().values())
    compose.run("down", "-v", "--remove-orphans", "--timeout", "20")
    assert compose.resources() == {"containers": [], "networks": [], "volumes": []}
