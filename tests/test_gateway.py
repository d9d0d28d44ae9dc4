"""The HTTP gateway against real nodes: the official openai client, plain httpx for
KServe v2 and the error cases. The gateway node serves nothing itself; a second
node serves fake models (runners/fake.py), so every answer crossed the swarm."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from conftest import NodeFactory

from node.client import SwarmClient
from node.daemon import Node
from node.gateway import Backend, Gateway, GatewayConfig
from protocols import Tensor
from protocols.errors import ConfigError
from runners.fake import WORDS, FakeRunner
from runners.openvino_embed import DIM, MODEL_NAME
from runners.remote import kserve_v2

TOKEN = "s3cret-token"
PRIORITY = "X-Swarm-Priority"


@asynccontextmanager
async def swarm(node_factory: NodeFactory, **http: Any) -> AsyncIterator[tuple[Node, Node, str]]:
    """(gateway node, serving node, gateway URL); the gateway node serves no models."""
    async with (
        node_factory("serving", models=("fake:echo", "fake:slow:300", "fake:lazy:3000")) as serving,
        node_factory(
            "gateway", models=(), peers=(serving.addrs[0],), http=GatewayConfig(**http)
        ) as gateway,
    ):
        assert gateway.gateway is not None and gateway.gateway.url.startswith("http://127.0.0.1:")
        yield gateway, serving, gateway.gateway.url


async def official(url: str, call: Callable[[Any], Any], api_key: str = "unused") -> Any:
    """One call of the official openai client (it blocks: run it in a thread)."""
    from openai import OpenAI

    def run() -> Any:
        with OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30) as client:
            return call(client)

    return await trio.to_thread.run_sync(run)


def words(text: str, n: int) -> str:
    """What FakeRunner answers for ``text`` in ``n`` chunks (its words are seeded by length)."""
    return "".join(WORDS[(len(text) + i) % len(WORDS)] + " " for i in range(n))


async def test_openai_client_lists_models_and_embeds_across_the_swarm(
    node_factory: NodeFactory,
) -> None:
    async with swarm(node_factory) as (_, serving, url):
        models = await official(url, lambda c: c.models.list())
        one = await official(url, lambda c: c.embeddings.create(model="echo", input="hello"))
        many = await official(
            url,
            lambda c: c.embeddings.create(
                model="ECHO", input=["a", "bb", "a"], encoding_format="float"
            ),
        )
        async with httpx.AsyncClient(base_url=url) as http:
            raw = await http.post("/v1/embeddings", json={"model": "echo", "input": "hello"})
            b64 = await http.post(
                "/v1/embeddings",
                json={"model": "echo", "input": "hello", "encoding_format": "base64"},
            )
    assert sorted(m.id for m in models.data) == ["echo", "lazy", "slow"]
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8  # FakeRunner's dim
    vectors = [d.embedding for d in many.data]
    assert [d.index for d in many.data] == [0, 1, 2]
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]  # row i is text i's
    # The client's default (base64) and plain floats carry the same float32 values.
    assert one.data[0].embedding == raw.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), "<f4")
    assert decoded.tolist() == raw.json()["data"][0]["embedding"]
    assert serving.services.service.stats.served >= 4


async def test_completions_and_chat_with_and_without_streaming(node_factory: NodeFactory) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with swarm(node_factory) as (gateway, _, url):
        done = await official(url, lambda c: c.completions.create(model="echo", prompt="p"))
        chat = await official(
            url, lambda c: c.chat.completions.create(model="echo", messages=messages)
        )

        def stream(client: Any) -> list[Any]:
            return list(
                client.chat.completions.create(
                    model="echo",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

        chunks = await official(url, stream)

        def stream_text(client: Any) -> list[Any]:
            return list(client.completions.create(model="slow", prompt="p", stream=True))

        text_chunks = await official(url, stream_text)
        async with httpx.AsyncClient(base_url=url) as http:
            raw = await http.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": messages, "stream": True},
            )
    # FakeRunner takes 'text': the gateway sends a fake model the prompt, or the messages'
    # JSON, there, and the words it streams back are seeded by that text's length.
    assert done.choices[0].text == words("p", 3)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "stop"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == words(json.dumps(messages), 3)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == chat.choices[0].message.content and len(pieces) == 3
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].text for c in text_chunks) == words("p", 3)
    body = raw.text
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert body.endswith("data: [DONE]\n\n") and body.count("data: ") == 5
    assert gateway.services.service.stats.forwarded == 5


async def test_kserve_v2_metadata_and_infer(node_factory: NodeFactory) -> None:
    x = [[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]]
    async with swarm(node_factory) as (_, _, url), httpx.AsyncClient(base_url=url) as http:
        live = await http.get("/v2/health/live")
        ready = await http.get("/v2/health/ready")
        meta = await http.get("/v2/models/echo")
        model_ready = await http.get("/v2/models/echo/ready")
        missing_ready = await http.get("/v2/models/nobody/ready")
        answer = await http.post(
            "/v2/models/echo/infer",
            json={
                "id": "req-1",
                "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x}],
                "outputs": [{"name": "embedding"}],
            },
        )
        text = await http.post(
            "/v2/models/echo/infer",
            json={
                "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]
            },
        )
        bad_shape = await http.post(
            "/v2/models/echo/infer",
            json={"inputs": [{"name": "x", "shape": [6], "datatype": "FP32", "data": [0] * 6}]},
        )
        content, length = kserve_v2.encode_binary_request(
            {"x": Tensor.from_numpy(np.array(x, dtype=np.float32))}, request_id="bin-1"
        )
        binary = await http.post(
            "/v2/models/echo/infer",
            content=content,
            headers={kserve_v2.HEADER_LENGTH: str(length)},
        )
        short = await http.post(
            "/v2/models/echo/infer",
            content=content[:-4],
            headers={kserve_v2.HEADER_LENGTH: str(length)},
        )
        bad_count = await http.post(
            "/v2/models/echo/infer",
            json={"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1]}]},
        )
    assert live.json() == {"live": True} and ready.status_code == 200
    assert meta.status_code == 200
    inputs = {i["name"]: i for i in meta.json()["inputs"]}
    assert inputs["x"] == {"name": "x", "datatype": "FP32", "shape": [-1, -1]}
    assert inputs["text"]["datatype"] == "BYTES"
    assert model_ready.json()["ready"] is True and missing_ready.status_code == 404
    out = answer.json()
    assert answer.status_code == 200 and out["id"] == "req-1" and out["model_name"] == "echo"
    [emb] = out["outputs"]  # only the output asked for
    assert emb["name"] == "embedding" and emb["datatype"] == "FP32" and emb["shape"] == [2, 8]
    rows = np.array(emb["data"], dtype=np.float32).reshape(2, 8)
    assert rows[:, 0].tolist() == [12.0, 2.0]  # FakeRunner: 2 * sum of each row of x
    names = {o["name"]: o for o in text.json()["outputs"]}
    assert names["embedding"]["shape"] == [2, 8] and names["text"]["datatype"] == "BYTES"
    assert binary.status_code == 200 and kserve_v2.HEADER_LENGTH in binary.headers
    decoded = kserve_v2.decode_binary_response(binary.content, "answer", request_id="bin-1")
    embedding = decoded["embedding"]
    assert isinstance(embedding, Tensor)
    np.testing.assert_array_equal(embedding.numpy(), rows)
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    assert bad_shape.status_code == 400 and "x" in bad_shape.json()["error"]
    assert bad_count.status_code == 400 and "shape" in bad_count.json()["error"]


async def test_errors_have_openai_shape_and_status(node_factory: NodeFactory) -> None:
    async with (
        swarm(node_factory, max_body=64 * 1024) as (_, _s, url),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        unknown = await http.post("/v1/embeddings", json={"model": "nobody", "input": "x"})
        bad_json = await http.post("/v1/embeddings", content=b"{not json")
        too_big = await http.post("/v1/embeddings", json={"model": "echo", "input": "x" * 100_000})
        bad_input = await http.post("/v1/embeddings", json={"model": "echo", "input": [1, 2]})
        bad_msgs = await http.post("/v1/chat/completions", json={"model": "echo", "messages": []})
        failures = {
            code: await http.post(
                "/v2/models/echo/infer",
                json={
                    "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                    "parameters": {"fail": code},
                },
            )
            for code in ("OVERLOADED", "NOT_EXECUTED", "DEADLINE_EXCEEDED", "INTERNAL")
        }
        no_route = await http.get("/v1/nothing-here")
        wrong_method = await http.get("/v1/embeddings")
        late = await http.post(
            "/v1/embeddings",
            json={"model": "lazy", "input": "x"},
            headers={"X-Swarm-Deadline-Ms": "200", "X-Swarm-Priority": "high"},
        )
        bad_deadline = await http.post(
            "/v1/embeddings",
            json={"model": "echo", "input": "x"},
            headers={"X-Swarm-Deadline-Ms": "soon"},
        )
        bad_priority = await http.post(
            "/v1/embeddings",
            json={"model": "echo", "input": "x"},
            headers={"X-Swarm-Priority": "urgent"},
        )
    for response, status, code in (
        (unknown, 404, "model_not_found"),
        (bad_json, 400, "invalid_json"),
        (too_big, 413, "request_too_large"),
        (bad_input, 400, "invalid_input"),
        (bad_msgs, 400, "invalid_input"),
        (no_route, 404, "not_found"),
        (wrong_method, 405, "method_not_allowed"),
        (late, 504, "deadline_exceeded"),
        (bad_deadline, 400, "invalid_header"),
        (bad_priority, 400, "invalid_header"),
    ):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"]
    statuses = {code: r.status_code for code, r in failures.items()}
    assert statuses == {
        "OVERLOADED": 429,
        "NOT_EXECUTED": 503,
        "DEADLINE_EXCEEDED": 504,
        "INTERNAL": 500,
    }, {code: r.text for code, r in failures.items()}
    assert int(failures["OVERLOADED"].headers["retry-after"]) >= 1


async def test_kserve_v2_errors_have_its_shape_and_status(node_factory: NodeFactory) -> None:
    """Every failure under /v2/ is ``{"error": "<message>"}`` (the Open Inference
    Protocol's), with the status and Retry-After the OpenAI routes give."""
    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}

    def failing(code: str) -> dict[str, Any]:
        return {"inputs": [text], "parameters": {"fail": code}}

    async with (
        swarm(node_factory, max_body=64 * 1024, token=TOKEN) as (_, _s, url),
        httpx.AsyncClient(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as http,
    ):
        answers = {
            "unknown": await http.post("/v2/models/nobody/infer", json={"inputs": [text]}),
            "unknown_metadata": await http.get("/v2/models/nobody"),
            "unknown_ready": await http.get("/v2/models/nobody/ready"),
            "version": await http.get("/v2/models/echo/versions/2"),
            "bad_input": await http.post(
                "/v2/models/echo/infer",
                json={"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1]}]},
            ),
            "runner_refused": await http.post(
                "/v2/models/echo/infer",
                json={"inputs": [{**text, "name": "nope"}]},
            ),
            "bad_json": await http.post("/v2/models/echo/infer", content=b"{not json"),
            "bad_header": await http.post(
                "/v2/models/echo/infer",
                content=b"{}",
                headers={kserve_v2.HEADER_LENGTH: "99"},
            ),
            "too_big": await http.post("/v2/models/echo/infer", content=b" " * 70_000),
            "no_token": await http.get("/v2/models/echo", headers={"Authorization": ""}),
            "overloaded": await http.post("/v2/models/echo/infer", json=failing("OVERLOADED")),
            "not_executed": await http.post("/v2/models/echo/infer", json=failing("NOT_EXECUTED")),
            "late": await http.post("/v2/models/echo/infer", json=failing("DEADLINE_EXCEEDED")),
            "internal": await http.post("/v2/models/echo/infer", json=failing("INTERNAL")),
            "bad_priority": await http.post(
                "/v2/models/echo/infer", json={"inputs": [text]}, headers={PRIORITY: "urgent"}
            ),
            "wrong_method": await http.get("/v2/models/echo/infer"),
            "no_route": await http.get("/v2/repository/index"),
        }
        openai_shape = await http.post("/v1/embeddings", content=b"{not json")
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {
        "unknown": 404,
        "unknown_metadata": 404,
        "unknown_ready": 404,
        "version": 404,
        "bad_input": 400,
        "runner_refused": 400,
        "bad_json": 400,
        "bad_header": 400,
        "too_big": 413,
        "no_token": 401,
        "overloaded": 429,
        "not_executed": 503,
        "late": 504,
        "internal": 500,
        "bad_priority": 400,
        "wrong_method": 405,
        "no_route": 404,
    }, {name: answer.text for name, answer in answers.items()}
    for name, answer in answers.items():
        body = answer.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), (name, body)
        assert body["error"], name
    assert answers["unknown"].json()["error"] == "no node of this swarm serves the model 'nobody'"
    assert "version 1 only" in answers["version"].json()["error"]
    assert answers["bad_json"].json()["error"].startswith("the body is not JSON")
    assert "the body is over 65536 bytes" in answers["too_big"].json()["error"]
    assert answers["no_token"].headers["www-authenticate"] == "Bearer"
    assert int(answers["overloaded"].headers["retry-after"]) >= 1
    assert "OVERLOADED" in answers["overloaded"].json()["error"]
    assert "traceback" not in answers["internal"].text.lower()
    assert openai_shape.json()["error"]["code"] == "invalid_json"  # /v1 keeps OpenAI's shape


async def test_token_guards_every_route_but_health(node_factory: NodeFactory) -> None:
    async with swarm(node_factory, token=TOKEN) as (_, _s, url):
        async with httpx.AsyncClient(base_url=url) as http:
            health = await http.get("/health")
            live = await http.get("/v2/health/live")
            denied = await http.get("/v1/models")
            wrong = await http.get("/status", headers={"Authorization": "Bearer nope"})
            status = await http.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
        models = await official(url, lambda c: c.models.list(), api_key=TOKEN)
    assert health.json() == {"status": "ok"} and live.status_code == 200
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert denied.json()["error"]["code"] == "unauthorized"
    assert wrong.status_code == 401
    view = status.json()
    assert status.status_code == 200 and view["peer_id"] and "hardware" in view
    [peer] = view["view"]["peers"]
    assert sorted(peer["models"]) == ["echo", "lazy", "slow"]
    assert {m.id for m in models.data} == {"echo", "lazy", "slow"}


def test_binding_beyond_loopback_needs_a_token_or_insecure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="beyond loopback"):
        GatewayConfig.parse("0.0.0.0:8080")
    with pytest.raises(ConfigError, match="unset or empty"):
        GatewayConfig.parse("0.0.0.0:8080", token_env="SWARM_TEST_NO_SUCH_VAR")
    monkeypatch.setenv("SWARM_TEST_TOKEN", TOKEN)
    guarded = GatewayConfig.parse("0.0.0.0:8080", token_env="SWARM_TEST_TOKEN")
    assert guarded.token == TOKEN and guarded.port == 8080
    assert GatewayConfig.parse("0.0.0.0:1", insecure=True).token is None
    assert GatewayConfig.parse("[::1]:9").host == "::1"
    assert GatewayConfig.parse("localhost:9").token is None
    with pytest.raises(ConfigError, match="HOST:PORT"):
        GatewayConfig.parse("8080")


async def test_a_client_that_leaves_a_stream_cancels_its_work(node_factory: NodeFactory) -> None:
    """lazy streams 3 chunks 1 s apart: leaving after the first frees both nodes at once."""
    async with swarm(node_factory) as (gateway, serving, url):
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            http.stream(
                "POST",
                "/v1/completions",
                json={"model": "lazy", "prompt": "p", "stream": True},
            ) as response,
        ):
            lines = response.aiter_lines()
            first = await anext(lines)
            await lines.aclose()
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["text"]
        left_at = trio.current_time()
        for _ in range(75):  # polled for 1.5 s at most; the stream's natural end is ~2 s away
            if not (gateway.services.service.in_flight or serving.services.service.in_flight):
                break
            await trio.sleep(0.02)
        assert not (gateway.services.service.in_flight or serving.services.service.in_flight)
        assert trio.current_time() - left_at < 1.5


TEXTS = ["a cat sits on the mat", "a kitten sits on a rug", "stock markets fell today"]


@asynccontextmanager
async def minilm_swarm(
    node_factory: NodeFactory, models_dir: Any, tmp_path: Any
) -> AsyncIterator[tuple[str, SwarmClient]]:
    """(gateway URL, a client of the serving node): all-MiniLM-L6-v2 (OpenVINO) on a
    peer of a gateway node that serves nothing (the session's converted IR, linked)."""
    target = tmp_path / "real" / "models" / MODEL_NAME
    target.parent.mkdir(parents=True)
    shutil.copytree(models_dir / MODEL_NAME, target, copy_function=os.link)
    async with (
        node_factory("real", models=(MODEL_NAME,)) as real,
        node_factory("gateway", models=(), peers=(real.addrs[0],), http=GatewayConfig()) as gateway,
        SwarmClient.connect(real.addrs[0]) as client,
    ):
        assert gateway.gateway is not None
        yield gateway.gateway.url, client


@pytest.mark.slow
async def test_real_embeddings_through_the_gateway_match_the_swarm(
    node_factory: NodeFactory, models_dir: Any, tmp_path: Any
) -> None:
    """all-MiniLM-L6-v2 (OpenVINO) on a peer, asked with the official openai client."""
    texts = TEXTS
    async with minilm_swarm(node_factory, models_dir, tmp_path) as (url, client):
        answer = await official(url, lambda c: c.embeddings.create(model=MODEL_NAME, input=texts))
        direct = await client.infer(MODEL_NAME, {"text": texts})
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    want = direct.outputs["embedding"]
    assert isinstance(want, Tensor) and got.shape == (3, DIM)
    np.testing.assert_array_equal(got, want.numpy())  # base64 float32: bit for bit
    # Word pieces plus [CLS] and [SEP]: every word here is one piece of BERT's vocabulary.
    counts = direct.outputs["tokens"]
    assert isinstance(counts, Tensor) and counts.numpy().tolist() == [8, 8, 6]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 22
    cos = got @ got.T / np.outer(np.linalg.norm(got, axis=1), np.linalg.norm(got, axis=1))
    assert cos[0, 1] > cos[0, 2] + 0.2


async def test_metrics_route_serves_what_the_backend_exports() -> None:
    """A Gateway on its own, with a Backend whose metrics are a fixed exposition."""
    exposition = b"# TYPE swarm_up gauge\nswarm_up 1.0\n"

    async def execute(request: Any, emit: Any) -> Any:
        raise AssertionError("no request is run here")

    stop = trio.Event()
    with_metrics = Backend(execute, dict, dict, metrics=lambda: exposition)
    without = Backend(execute, dict, dict)
    async with trio.open_nursery() as nursery:
        urls = []
        for backend in (with_metrics, without):
            gateway = Gateway(backend, GatewayConfig(), shutdown=stop.wait, grace_s=1)
            urls.append(await nursery.start(gateway.run))
        async with httpx.AsyncClient() as http:
            served = await http.get(f"{urls[0]}/metrics")
            absent = await http.get(f"{urls[1]}/metrics")
        stop.set()
    assert served.status_code == 200 and served.content == exposition
    assert served.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "not_found"


async def test_kserve_v2_metadata_reads_records_old_and_new() -> None:
    """Outputs come from the record's description; records from before outputs were
    declared (none, or a text listing names) and entries that do not read declare none."""
    new = FakeRunner("new", dim=4).info.describe()
    old = {**{k: v for k, v in new.items() if k != "outputs"}, "name": "old"}
    odd = {**new, "name": "odd", "outputs": "probs,logits"}
    garbled = {
        **new,
        "name": "garbled",
        "outputs": [
            1,
            {"name": "no-kind", "shape": [1]},
            {"name": "complex", "kind": "tensor", "dtype": "complex64", "shape": [1]},
            {"name": "bad-shape", "kind": "text", "shape": [-2]},
            {"name": "ok", "kind": "text", "shape": [-1]},
        ],
    }
    described = {d["name"]: d for d in (new, old, odd, garbled)}

    async def execute(request: Any, emit: Any) -> Any:
        raise AssertionError("no request is run here")

    stop = trio.Event()
    gateway = Gateway(
        Backend(execute, lambda: described, dict), GatewayConfig(), shutdown=stop.wait, grace_s=1
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(gateway.run)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answers = {name: await http.get(f"/v2/models/{name}") for name in described}
        stop.set()
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(described, 200)
    outputs = {name: a.json()["outputs"] for name, a in answers.items()}
    assert outputs == {
        "new": [
            {"name": "embedding", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "text", "datatype": "BYTES", "shape": [1]},
        ],
        "old": [],
        "odd": [],
        "garbled": [{"name": "ok", "datatype": "BYTES", "shape": [-1]}],
    }
    assert answers["old"].json()["inputs"] == answers["new"].json()["inputs"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "lazy", "input": "a"}),
        ("/v1/completions", {"model": "lazy", "prompt": "p"}),
        (
            "/v2/models/lazy/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
        ),
    ],
)
async def test_a_client_that_leaves_a_plain_request_cancels_its_work(
    node_factory: NodeFactory, path: str, body: dict[str, Any]
) -> None:
    """lazy takes 3 s: a client that gives up after 0.5 s frees both nodes at once."""
    async with swarm(node_factory) as (gateway, serving, url):
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(path, json=body)
        assert serving.services.service.in_flight == 1 or gateway.services.service.in_flight == 1
        left_at = trio.current_time()
        for _ in range(75):  # polled for 1.5 s at most; the job's natural end is ~2.5 s away
            if not (gateway.services.service.in_flight or serving.services.service.in_flight):
                break
            await trio.sleep(0.02)
        assert not (gateway.services.service.in_flight or serving.services.service.in_flight)
        assert trio.current_time() - left_at < 1.5


async def test_kserve_v2_versioned_paths(node_factory: NodeFactory) -> None:
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
    async with swarm(node_factory) as (_, _s, url), httpx.AsyncClient(base_url=url) as http:
        meta = await http.get("/v2/models/echo/versions/1")
        ready = await http.get("/v2/models/echo/versions/1/ready")
        answer = await http.post("/v2/models/echo/versions/1/infer", json={"inputs": [tensor]})
        other = await http.post("/v2/models/echo/versions/7/infer", json={"inputs": [tensor]})
        other_meta = await http.get("/v2/models/echo/versions/7")
    assert meta.status_code == 200 and meta.json()["versions"] == ["1"]
    assert ready.json() == {"name": "echo", "ready": True}
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    [emb] = [o for o in answer.json()["outputs"] if o["name"] == "embedding"]
    assert emb["data"][0] == 6.0  # FakeRunner: 2 * (1 + 2)
    for missing in (other, other_meta):
        assert missing.status_code == 404
        assert missing.json() == {"error": "echo is served as version 1 only, not '7'"}


async def test_n_choices_run_as_separate_jobs(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gateway, _, url):
        three = await official(url, lambda c: c.completions.create(model="echo", prompt="p", n=3))

        def stream(client: Any) -> list[Any]:
            return list(
                client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "x"}], n=2, stream=True
                )
            )

        chunks = await official(url, stream)
        async with httpx.AsyncClient(base_url=url) as http:
            refused = [
                await http.post("/v1/completions", json={"model": "echo", "prompt": "p", **extra})
                for extra in ({"n": 0}, {"n": 9}, {"n": "2"}, {"tools": [{"type": "function"}]})
            ]
            logprobs = await http.post(
                "/v1/completions", json={"model": "echo", "prompt": "p", "logprobs": 2}
            )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.text == words("p", 3) for c in three.choices)
    per_choice: dict[int, str] = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            per_choice[choice.index] += choice.delta.content or ""
    expected = words(json.dumps([{"role": "user", "content": "x"}]), 3)
    assert per_choice == {0: expected, 1: expected}
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    assert [r.status_code for r in refused] == [400, 400, 400, 400]
    assert refused[3].json()["error"]["code"] == "unsupported_parameter"
    assert "tools" in refused[3].json()["error"]["message"]
    assert logprobs.status_code == 400 and "logprobs" in logprobs.json()["error"]["message"]
    assert gateway.services.service.stats.forwarded == 5
