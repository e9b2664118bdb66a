"""The head node's OpenAI-compatible HTTP API against an embedded cluster with a tiny random
model: every route, greedy text equal to the in-process generator's, streaming, stop strings,
OpenAI-shaped 4xx errors, a client leaving mid-stream, and the official ``openai`` package."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from edgeheads.headnode import Client
from edgeheads.headnode.embedded import LocalCluster
from edgeheads.headnode.loading import load_model
from edgeheads.headnode.local import LocalGenerator
from edgeheads.headnode.sampling import SamplingParams
from tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.system

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def tiny_model(save_tiny_model):
    return save_tiny_model(TINY_CONFIGS["llama-gqa"], "llama-http-api", seed=7)


@pytest.fixture(scope="module")
def cluster(tiny_model):
    with LocalCluster(str(tiny_model), workers=2, progress=False) as c:
        assert c.http_address, "the head node wrote no HTTP address"
        yield c


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=f"http://{cluster.http_address}/v1", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def local(tiny_model):
    return LocalGenerator(load_model(str(tiny_model), progress=False))


def sse_payloads(lines) -> list:
    """The data of each server-sent event; "[DONE]" stays a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream(http: httpx.Client, route: str, body: dict) -> list:
    with http.stream("POST", route, json={**body, "stream": True}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        return sse_payloads(reply.iter_lines())


def test_models_lists_the_served_model(http, tiny_model):
    reply = http.get("/models")
    assert reply.status_code == 200
    assert [m["id"] for m in reply.json()["data"]] == [str(tiny_model)]


def test_completion_greedy_matches_the_local_generator(http, local, tiny_model):
    expected = local.generate(PROMPT, SamplingParams(max_new_tokens=20), chat=False)
    reply = http.post("/completions", json={"model": str(tiny_model), "prompt": PROMPT, "max_tokens": 20,
                                            "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == ("length" if expected.finish_reason == "length" else "stop")
    n_prompt = len(local.encode(PROMPT, chat=False))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(expected.token_ids),
                             "total_tokens": n_prompt + len(expected.token_ids)}


def test_chat_greedy_matches_the_local_generator(http, local):
    expected = local.generate("Tell me a joke.", SamplingParams(max_new_tokens=16), chat=True)
    reply = http.post("/chat/completions", json={
        "messages": [{"role": "user", "content": "Tell me a joke."}], "max_tokens": 16, "temperature": 0})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert reply.json()["usage"]["completion_tokens"] == len(expected.token_ids)


@pytest.mark.parametrize("route,body,field", [
    ("/completions", {"prompt": PROMPT}, "text"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}]}, "content"),
])
def test_stream_joins_to_the_plain_reply(http, route, body, field):
    body = {**body, "max_tokens": 24, "temperature": 0}
    plain = http.post(route, json=body).json()
    events = stream(http, route, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    if field == "text":
        text = "".join(c["choices"][0]["text"] for c in chunks)
        want = plain["choices"][0]["text"]
    else:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        want = plain["choices"][0]["message"]["content"]
    assert text == want
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_stop_strings_end_the_text_and_are_not_returned(http):
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    full = http.post("/completions", json=body).json()["choices"][0]["text"]
    assert len(full) > 12, full
    stop = full[8:11]
    want = full[:full.find(stop)]
    for stops in (stop, ["never-generated", stop]):
        reply = http.post("/completions", json={**body, "stop": stops}).json()
        assert reply["choices"][0] == {"index": 0, "text": want, "logprobs": None, "finish_reason": "stop"}
        events = stream(http, "/completions", {**body, "stop": stops})
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("route,body,status,param", [
    ("/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/completions", {"prompt": "x", "stop": 7}, 400, "stop"),
    ("/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/chat/completions", {"messages": []}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/completions", {"prompt": "Hello " * 600}, 400, "prompt"),
    ("/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "prompt"),
    ("/completions", b'{"prompt": "x",', 400, None),
    ("/completions", b'[1, 2]', 400, None),
])
def test_bad_requests_get_openai_errors(http, route, body, status, param):
    reply = http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_routes_and_methods_get_openai_errors(http):
    for reply in (http.get("/nothing"), http.get("/completions")):
        assert reply.status_code in (404, 405) and reply.json()["error"]["message"]


def test_a_client_leaving_mid_stream_ends_its_session(http, cluster):
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": 3, "stream": True}
    with http.stream("POST", "/completions", json=body) as reply:
        assert reply.status_code == 200
        next(reply.iter_lines())
    with Client(cluster.address) as client:
        deadline = time.monotonic() + 20
        while client.status()["active_sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.status()["active_sessions"] == 0


def test_the_openai_package_works_against_it(cluster, tiny_model, local, require_capability):
    try:
        import openai
    except ImportError:
        openai = None
    require_capability("the openai package (the test extra)", openai is not None)
    client = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [str(tiny_model)]
    expected = local.generate(PROMPT, SamplingParams(max_new_tokens=12), chat=False).text
    done = client.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens >= 1
    parts = client.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=12, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in parts) == expected
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    chat = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=10, temperature=0)
    parts = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=10, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
    chunks = list(parts)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(tiny_model), prompt="x", temperature=5)


def test_http_listen_is_configured_like_every_setting(monkeypatch, tmp_path):
    """Default 0.0.0.0:8080; the file, EDGEHEADS_HEADNODE__HTTP_LISTEN and --http-listen set it;
    null (or off) turns it off."""
    from edgeheads.common.config import load_config
    from edgeheads.headnode import cli, daemon
    from edgeheads.headnode.config import HeadnodeConfig

    monkeypatch.delenv("EDGEHEADS_HEADNODE__HTTP_LISTEN", raising=False)
    assert load_config(HeadnodeConfig).headnode.http_listen == "0.0.0.0:8080"
    cfg = tmp_path / "h.yaml"
    cfg.write_text("headnode:\n  http_listen: null\n")
    assert load_config(HeadnodeConfig, cfg).headnode.http_listen is None
    monkeypatch.setenv("EDGEHEADS_HEADNODE__HTTP_LISTEN", "127.0.0.1:8123")
    assert load_config(HeadnodeConfig, cfg).headnode.http_listen == "127.0.0.1:8123"
    seen = []

    async def fake_run(settings, grpc_settings, ready_file=None, progress=True, **_):
        seen.append(settings.http_listen)

    monkeypatch.setattr(daemon, "run_headnode", fake_run)
    assert cli.main(["headnode", "--http-listen", "off"]) == 0
    assert cli.main(["headnode", "--http-listen", "127.0.0.1:0"]) == 0
    assert cli.main(["headnode"]) == 0
    assert seen == [None, "127.0.0.1:0", "127.0.0.1:8123"]
    assert cli.main(["headnode", "--http-listen", "nowhere"]) == 1
