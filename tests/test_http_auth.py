"""The OpenAI-compatible HTTP API behind the cluster token: a real embedded cluster with
EDGEHEADS_SECURITY__TOKEN (a token without TLS), reached with httpx and the official ``openai``
package; a refusal is 401 in OpenAI's shape and logged in the head node's log, without the
token. Without a token, a listener beyond loopback is warned about at start."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.http_api import exposure_warning
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

TOKEN = "http-api-token-0c4f7d2a91e35b68"
PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def tiny_model(save_tiny_model):
    return save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-http-auth", seed=7)


@pytest.fixture(scope="module")
def cluster(tiny_model):
    with LocalCluster(str(tiny_model), workers=2, progress=False,
                      extra_env={"EDGEHEADS_SECURITY__TOKEN": TOKEN}) as c:
        assert c.http_address, "the head node wrote no HTTP address"
        yield c


def base_url(cluster: LocalCluster) -> str:
    return f"http://{cluster.http_address}/v1"


def wait_for_log(cluster: LocalCluster, name: str, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in (cluster.dir / f"{name}.log").read_text(errors="replace").splitlines():
            if text in line:
                return line
        assert time.monotonic() < deadline, f"{text!r} not in {name}'s log:\n{cluster.log_tail(name)}"
        time.sleep(0.1)


def assert_refused(reply: httpx.Response) -> None:
    assert reply.status_code == 401, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert TOKEN not in reply.text


@pytest.mark.parametrize("method,route", [("GET", "/models"), ("POST", "/completions"),
                                          ("POST", "/chat/completions"), ("GET", "/no-such-route")])
def test_every_route_needs_the_token(cluster, method, route):
    body = {"prompt": PROMPT, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=base_url(cluster), timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            assert_refused(http.request(method, route, json=body if method == "POST" else None, headers=headers))


def test_the_right_token_is_served(cluster, tiny_model):
    with httpx.Client(base_url=base_url(cluster), timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        assert [m["id"] for m in http.get("/models").json()["data"]] == [str(tiny_model)]
        reply = http.post("/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        with http.stream("POST", "/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as s:
            assert s.status_code == 200
            assert "data: [DONE]" in list(s.iter_lines())


def test_the_openai_package_with_the_token_as_its_api_key(cluster, tiny_model):
    client = openai.OpenAI(base_url=base_url(cluster), api_key=TOKEN, max_retries=0, timeout=60)
    reply = client.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=3, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")

    wrong = openai.OpenAI(base_url=base_url(cluster), api_key="not-the-cluster-token", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=4)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_refusal_is_logged_without_the_token(cluster):
    httpx.get(f"{base_url(cluster)}/models", headers={"Authorization": "Bearer another-wrong-token-42"})
    line = wait_for_log(cluster, "headnode", "refused an HTTP request to GET /v1/models from 127.0.0.1:")
    assert line.endswith(("a wrong cluster token", "since the last report)", "no cluster token")), line
    log = (cluster.dir / "headnode.log").read_text(errors="replace")
    assert log.count("refused an HTTP request") < 4  # rate-limited per reason and host, as for gRPC
    assert TOKEN not in log
    assert "WITHOUT A TOKEN" not in log  # loopback, and a token


def test_the_exposure_warning():
    assert exposure_warning("127.0.0.1:8080", None) is None
    assert exposure_warning("localhost:8080", None) is None
    assert exposure_warning("0.0.0.0:8080", TOKEN) is None
    warning = exposure_warning("0.0.0.0:8080", None)
    assert warning and "0.0.0.0:8080 WITHOUT A TOKEN" in warning and "security.token" in warning


def test_an_open_api_beyond_loopback_is_warned_about_at_start(tiny_model):
    env = {"EDGEHEADS_HEADNODE__HTTP_LISTEN": "0.0.0.0:0"}
    with LocalCluster(str(tiny_model), workers=1, progress=False, extra_env=env) as c:
        line = wait_for_log(c, "headnode", "WITHOUT A TOKEN")
        assert "OpenAI-compatible HTTP API on 0.0.0.0:0" in line
        port = c.http_address.rsplit(":", 1)[1]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).status_code == 200  # open, as before
