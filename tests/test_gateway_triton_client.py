"""NVIDIA's Triton client (``tritonclient.http``) against the gateway's KServe v2 routes.

A client that shares no code with the gateway, and the strictest reader of the
protocol's answers: its exceptions take their message from ``{"error": "..."}``
(and break on any other error shape), and its results decode the binary tensor
extension by the header's sizes. It blocks (gevent underneath), so it runs in a
thread. The gateway node serves nothing; a peer serves ``fake:echo``, so every
answer crossed the swarm.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio
from conftest import NodeFactory

from node.gateway import GatewayConfig

X = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]], dtype=np.float32)
TIMEOUT_S = 30.0


@asynccontextmanager
async def gateway_url(node_factory: NodeFactory) -> AsyncIterator[str]:
    async with (
        node_factory("serving", models=("fake:echo",)) as serving,
        node_factory(
            "gateway", models=(), peers=(serving.addrs[0],), http=GatewayConfig()
        ) as gateway,
    ):
        assert gateway.gateway is not None
        yield gateway.gateway.url


async def with_client(url: str, calls: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``calls(client)`` with a Triton HTTP client of the gateway, in a thread."""

    def run() -> dict[str, Any]:
        import tritonclient.http as triton

        client = triton.InferenceServerClient(
            url.removeprefix("http://"),
            connection_timeout=TIMEOUT_S,
            network_timeout=TIMEOUT_S,
        )
        try:
            return calls(client)
        finally:
            client.close()

    with trio.fail_after(2 * TIMEOUT_S):
        return await trio.to_thread.run_sync(run)


def refusal(call: Callable[[], Any]) -> dict[str, Any]:
    """What the client's exception says when ``call`` is refused."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return {"str": str(exc), "status": exc.status(), "message": exc.message()}
    raise AssertionError("the call was not refused")


def x_input(x: np.ndarray[Any, Any], *, binary: bool) -> Any:
    import tritonclient.http as triton

    tensor = triton.InferInput("x", list(x.shape), "FP32" if x.dtype == np.float32 else "INT32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


async def test_refusals_raise_exceptions_that_hold_our_message(node_factory: NodeFactory) -> None:
    def calls(client: Any) -> dict[str, Any]:
        x = x_input(X, binary=False)
        return {
            "unknown": refusal(lambda: client.infer("nobody", [x])),
            "unknown_metadata": refusal(lambda: client.get_model_metadata("nobody")),
            "version": refusal(lambda: client.get_model_metadata("echo", model_version="7")),
            "bad_input": refusal(
                lambda: client.infer("echo", [x_input(X.astype(np.int32), binary=True)])
            ),
            "bad_shape": refusal(lambda: client.infer("echo", [x_input(X.ravel(), binary=False)])),
            "still_ready": client.is_model_ready("echo"),
        }

    async with gateway_url(node_factory) as url:
        got = await with_client(url, calls)
    unknown = got["unknown"]
    assert unknown["status"] == "404" and unknown == got["unknown_metadata"]
    assert unknown["str"] == "[404] no node of this swarm serves the model 'nobody'"
    version = got["version"]
    assert version["status"] == "404" and "version 1 only" in version["str"]
    bad_input = got["bad_input"]
    assert bad_input["status"] == "400"
    assert bad_input["message"] == "BAD_REQUEST: echo: input 'x' has dtype int32, expected float32"
    assert got["bad_shape"]["status"] == "400" and "shape [6]" in got["bad_shape"]["message"]
    assert got["still_ready"] is True


def outputs_of(result: Any, names: list[str]) -> dict[str, tuple[dict[str, Any], Any]]:
    """Each output's header (name, datatype, shape) and its array, as the client reads them."""
    return {name: (result.get_output(name), result.as_numpy(name)) for name in names}


async def test_metadata_declares_the_outputs_infer_returns(node_factory: NodeFactory) -> None:
    def calls(client: Any) -> dict[str, Any]:
        import tritonclient.http as triton

        def wanted(binary: bool) -> list[Any]:
            return [
                triton.InferRequestedOutput(n, binary_data=binary) for n in ("embedding", "text")
            ]

        text = triton.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array(["a", "bé"], dtype=object), binary_data=True)
        json_answer = client.infer(
            "echo", [x_input(X, binary=False)], outputs=wanted(False), request_id="t-1"
        )
        binary_answer = client.infer("echo", [x_input(X, binary=True)], outputs=wanted(True))
        texts_answer = client.infer("echo", [text])  # no outputs named: all of them, as JSON
        names = ["embedding", "text"]
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready("echo"),
            "missing_ready": client.is_model_ready("nobody"),
            "metadata": client.get_model_metadata("echo"),
            "id": json_answer.get_response()["id"],
            "json": outputs_of(json_answer, names),
            "binary": outputs_of(binary_answer, names),
            "texts": outputs_of(texts_answer, names),
        }

    async with gateway_url(node_factory) as url:
        got = await with_client(url, calls)
    assert got["live"] and got["ready"] and got["model_ready"] and not got["missing_ready"]
    meta = got["metadata"]
    assert meta["name"] == "echo" and meta["versions"] == ["1"]
    declared = {o["name"]: o for o in meta["outputs"]}
    assert declared == {
        "embedding": {"name": "embedding", "datatype": "FP32", "shape": [-1, 8]},
        "text": {"name": "text", "datatype": "BYTES", "shape": [1]},
    }
    for answer in ("json", "binary", "texts"):
        for name, (header, array) in got[answer].items():
            want = declared[name]
            assert header["datatype"] == want["datatype"], (answer, name)
            assert len(header["shape"]) == len(want["shape"]) == array.ndim, (answer, name)
            for size, declared_size in zip(header["shape"], want["shape"], strict=True):
                assert declared_size in (-1, size), (answer, name, header["shape"])
            assert list(array.shape) == header["shape"]
    assert got["id"] == "t-1"
    embedding = got["json"]["embedding"][1]
    assert embedding.dtype == np.float32 and embedding.shape == (2, 8)
    np.testing.assert_array_equal(embedding[:, 0], 2 * X.sum(axis=1))  # FakeRunner's rule
    np.testing.assert_array_equal(got["binary"]["embedding"][1], embedding)
    # The client reads BYTES as bytes from binary data and as str from JSON.
    assert [b.decode() for b in got["binary"]["text"][1]] == got["json"]["text"][1].tolist()
    assert got["json"]["text"][1].tolist() == ["alpha bravo charlie "]  # FakeRunner's words
    assert "binary_data_size" in got["binary"]["embedding"][0]["parameters"]
    rows = got["texts"]["embedding"][1]
    assert rows.shape == (2, 8) and not np.array_equal(rows[0], rows[1])
