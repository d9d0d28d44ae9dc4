"""KServe's own Python client (kserve 0.21's ``InferenceRESTClient``, protocol v2)
against the gateway: readiness, then inference answered by a peer's fake model.
It is asyncio code, and it runs in a child process of its own: kserve and tritonclient
both register protobuf package ``inference`` (``inference.ServerLiveRequest`` and the
rest) in protobuf's default descriptor pool, and one process holds only one of them, so
with kserve imported here every tritonclient.grpc test after this file failed."""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import trio
from conftest import NodeFactory

from node.gateway import GatewayConfig

X = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]], dtype=np.float32)


def kserve_calls(url: str) -> dict[str, Any]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def calls() -> dict[str, Any]:
        config = RESTConfig(protocol="v2", retries=0, timeout=30)
        async with InferenceRESTClient(config) as client:
            x = InferInput("x", list(X.shape), "FP32")
            x.set_data_from_numpy(X, binary_data=False)
            request = InferRequest("echo", [x], request_id="k-1")
            answer = await client.infer(url, request, model_name="echo")
            # The client's default: raw bytes after the JSON header, and binary outputs.
            raw = InferInput("x", list(X.shape), "FP32")
            raw.set_data_from_numpy(X)
            text = InferInput("text", [2], "BYTES")
            text.set_data_from_numpy(np.array(["a", "bé"], dtype=object))
            binary = await client.infer(
                url,
                InferRequest("echo", [raw], parameters={"binary_data_output": True}),
                model_name="echo",
            )
            texts = await client.infer(url, InferRequest("echo", [text]), model_name="echo")
            return {
                "live": await client.is_server_live(url),
                "ready": await client.is_model_ready(url, "echo"),
                "missing": await client.is_model_ready(url, "nobody"),
                "id": answer.id,
                "outputs": {o.name: o.as_numpy() for o in answer.outputs},
                "binary": {o.name: o.as_numpy() for o in binary.outputs},
                "texts": {o.name: o.as_numpy() for o in texts.outputs},
            }

    return asyncio.run(calls())


def in_child(url: str) -> dict[str, Any]:
    """kserve_calls in a fresh interpreter (spawned, not forked: a fork would copy this
    process's protobuf pool and trio's state); numpy arrays come back pickled."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(kserve_calls, url).result(timeout=120)
    assert "kserve" not in sys.modules  # kept out of this process, see the docstring
    return got


async def test_kserve_client_infers_through_the_gateway(node_factory: NodeFactory) -> None:
    async with (
        node_factory("serving", models=("fake:echo",)) as serving,
        node_factory(
            "gateway", models=(), peers=(serving.addrs[0],), http=GatewayConfig()
        ) as gateway,
    ):
        assert gateway.gateway is not None
        got = await trio.to_thread.run_sync(in_child, gateway.gateway.url)
    assert got["live"] and got["ready"] and not got["missing"]
    assert got["id"] == "k-1"
    embedding = got["outputs"]["embedding"]
    assert embedding.dtype == np.float32 and embedding.shape == (2, 8)
    np.testing.assert_array_equal(embedding[:, 0], 2 * X.sum(axis=1))  # FakeRunner's rule
    assert got["outputs"]["text"].dtype == object  # BYTES come back as strings
    np.testing.assert_array_equal(got["binary"]["embedding"], embedding)
    assert got["binary"]["text"].tolist() == got["outputs"]["text"].tolist()
    rows = got["texts"]["embedding"]
    assert rows.shape == (2, 8) and not np.array_equal(rows[0], rows[1])
