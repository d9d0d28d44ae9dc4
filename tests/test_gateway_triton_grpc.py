"""NVIDIA's Triton gRPC client (``tritonclient.grpc``) against the node's KServe v2 gRPC port.

The client shares no code with the node: its messages are its own copy of the
protocol (Triton's grpc_service.proto), it sends tensors as raw_input_contents
and reads raw_output_contents, and it raises ``InferenceServerException`` with
the call's status code and message. It blocks, so it runs in a thread, while
the nodes serve on the test's trio loop. The gateway node serves nothing
itself unless a test says so: a peer serves the models, so every answer
crossed the swarm.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import trio
from conftest import NodeFactory
from support import eventually

from bootstrap.table import live_peers
from node.client import SwarmClient
from node.daemon import Node
from node.data_dir import read_state
from node.errors import sole_error
from node.gateway.config import GrpcConfig
from protocols import Tensor
from protocols.errors import ConfigError
from runners.fake import FakeRunner
from runners.openvino_embed import MODEL_NAME

X = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]], dtype=np.float32)
BIG = np.zeros((1, 2_400_000), dtype=np.float32)
TOKEN = "grpc-s3cret"
BEARER = {"authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 30.0
INFER = "/inference.GRPCInferenceService/ModelInfer"
T = TypeVar("T")


@asynccontextmanager
async def grpc_swarm(
    node_factory: NodeFactory, *, token: str | None = None, **serving: Any
) -> AsyncIterator[tuple[Node, Node, str]]:
    """(gateway node, serving node, the gateway's gRPC address): the gateway node
    serves nothing; its peer serves ``fake:echo`` unless ``serving`` says otherwise."""
    serving = serving or {"models": ("fake:echo",)}
    async with (
        node_factory("serving", **serving) as server,
        node_factory(
            "gateway", models=(), peers=(server.addrs[0],), grpc=GrpcConfig(token=token)
        ) as gateway,
    ):
        assert gateway.services.grpc is not None
        yield gateway, server, gateway.services.grpc.address


async def with_client(address: str, calls: Callable[[Any], T]) -> T:
    """``calls(client)`` with a Triton gRPC client of ``address``, in a thread."""

    def run() -> T:
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(address)
        try:
            return calls(client)
        finally:
            client.close()

    with trio.fail_after(2 * TIMEOUT_S):
        return await trio.to_thread.run_sync(run)


def refusal(call: Callable[[], Any]) -> dict[str, str]:
    """The status and message of the exception ``call`` raises."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    raise AssertionError("the call was not refused")


def tensor(name: str, array: np.ndarray[Any, Any], datatype: str) -> Any:
    import tritonclient.grpc as triton

    given = triton.InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array)
    return given


async def test_health_metadata_and_infer_through_the_swarm(node_factory: NodeFactory) -> None:
    def calls(client: Any) -> dict[str, Any]:
        import tritonclient.grpc as triton

        wanted = [triton.InferRequestedOutput("embedding"), triton.InferRequestedOutput("text")]
        numbers = client.infer("echo", [tensor("x", X, "FP32")], outputs=wanted, request_id="g-1")
        words = np.array(["a", "bé"], dtype=object)
        texts = client.infer("echo", [tensor("text", words, "BYTES")])  # every output
        only = client.infer(
            "ECHO", [tensor("x", X, "FP32")], outputs=[triton.InferRequestedOutput("text")]
        )
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "server": client.get_server_metadata(as_json=True),
            "model_ready": client.is_model_ready("echo"),
            "versioned_ready": client.is_model_ready("echo", model_version="1"),
            "other_version_ready": client.is_model_ready("echo", model_version="2"),
            "missing_ready": client.is_model_ready("nobody"),
            "metadata": client.get_model_metadata("echo", as_json=True),
            "numbers": numbers.get_response(as_json=True),
            "embedding": numbers.as_numpy("embedding"),
            "text": numbers.as_numpy("text"),
            "texts": texts.get_response(as_json=True),
            "text_rows": texts.as_numpy("embedding"),
            "only": only.get_response(as_json=True),
        }

    async with grpc_swarm(node_factory) as (_, _, address):
        got = await with_client(address, calls)
    assert got["live"] and got["ready"] and got["model_ready"] and got["versioned_ready"]
    assert not got["other_version_ready"] and not got["missing_ready"]
    assert got["server"]["name"] == "swarm" and got["server"]["version"]
    meta = got["metadata"]
    assert (meta["name"], meta["versions"], meta["platform"]) == ("echo", ["1"], "swarm-fake")
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "text": ("BYTES", ["-1"]),  # the client's JSON writes int64 as strings
        "x": ("FP32", ["-1", "-1"]),
    }
    declared = {o["name"]: o for o in meta["outputs"]}
    assert declared == {
        "embedding": {"name": "embedding", "datatype": "FP32", "shape": ["-1", "8"]},
        "text": {"name": "text", "datatype": "BYTES", "shape": ["1"]},
    }
    for answer in ("numbers", "texts"):
        for output in got[answer]["outputs"]:
            want = declared[output["name"]]
            assert output["datatype"] == want["datatype"], (answer, output)
            assert len(output["shape"]) == len(want["shape"]), (answer, output)
            for size, declared_size in zip(output["shape"], want["shape"], strict=True):
                assert declared_size in ("-1", size), (answer, output)
    numbers = got["numbers"]
    assert numbers["id"] == "g-1" and numbers["model_name"] == "echo"
    assert [o["name"] for o in numbers["outputs"]] == ["embedding", "text"]
    embedding = got["embedding"]
    assert embedding.dtype == np.float32 and embedding.shape == (2, 8)
    np.testing.assert_array_equal(embedding[:, 0], 2 * X.sum(axis=1))  # FakeRunner's rule
    assert got["text"].tolist() == [b"alpha bravo charlie "]  # BYTES come back as bytes
    rows = got["text_rows"]
    assert rows.shape == (2, 8) and not np.array_equal(rows[0], rows[1])
    assert {o["name"] for o in got["texts"]["outputs"]} == {"embedding", "text"}
    assert [o["name"] for o in got["only"]["outputs"]] == ["text"]
    assert got["only"]["model_name"] == "echo"  # as the swarm names it, not as asked


def typed_request(datatype: str, shape: list[int], **contents: Any) -> Any:
    """A ModelInferRequest of tritonclient's own messages, its data in ``contents``."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="echo")
    given = request.inputs.add(name="x", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(given.contents, field).extend(values)
    return request


def raw_call(address: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """ModelInfer on a plain grpc channel: what tritonclient cannot send (typed contents)."""
    from tritonclient.grpc import service_pb2

    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            INFER,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        try:
            return infer(request, timeout=TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            return (exc.code(), exc.details())


async def test_typed_contents_are_read_and_checked_like_raw_ones(
    node_factory: NodeFactory,
) -> None:
    def calls(address: str) -> dict[str, Any]:
        flat = X.ravel().tolist()
        return {
            "fp32": raw_call(address, typed_request("FP32", [2, 3], fp32_contents=flat)),
            "wrong_field": raw_call(address, typed_request("FP32", [2, 3], fp64_contents=flat)),
            "count": raw_call(address, typed_request("FP32", [2, 2], fp32_contents=flat)),
            "fp16": raw_call(address, typed_request("FP16", [1], fp32_contents=[1.0])),
            "bf16": raw_call(address, typed_request("BF16", [1], fp32_contents=[1.0])),
            "int8": raw_call(address, typed_request("INT8", [1], int_contents=[300])),
        }

    async with grpc_swarm(node_factory) as (_, _, address):
        got = await trio.to_thread.run_sync(calls, address)
    answer = got["fp32"]
    assert [o.name for o in answer.outputs] == ["embedding", "text"]
    assert len(answer.raw_output_contents) == 2 and not answer.outputs[0].HasField("contents")
    embedding = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, 8)
    np.testing.assert_array_equal(embedding[:, 0], 2 * X.sum(axis=1))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert got["wrong_field"] == (
        invalid,
        "inputs[0] (x): FP32 data belongs in contents.fp32_contents, not fp64_contents",
    )
    assert got["count"][0] == invalid and "6 values for shape [2, 2]" in got["count"][1]
    assert got["fp16"] == (invalid, "inputs[0] (x): FP16 data travels in raw_input_contents only")
    assert got["bf16"][0] == invalid and "unknown datatype 'BF16'" in got["bf16"][1]
    assert got["int8"][0] == invalid and "out of range for int8" in got["int8"][1]


async def test_refusals_carry_grpc_status_codes(node_factory: NodeFactory) -> None:
    def calls(client: Any) -> dict[str, Any]:
        import tritonclient.grpc as triton

        x = tensor("x", X, "FP32")
        return {
            "no_token": refusal(lambda: client.infer("echo", [x])),
            "bad_token": refusal(
                lambda: client.get_model_metadata("echo", headers={"authorization": "Bearer no"})
            ),
            "live_without_token": client.is_server_live(),
            "unknown": refusal(lambda: client.infer("nobody", [x], headers=BEARER)),
            "unknown_metadata": refusal(
                lambda: client.get_model_metadata("nobody", headers=BEARER)
            ),
            "version": refusal(
                lambda: client.get_model_metadata("echo", model_version="7", headers=BEARER)
            ),
            "dtype": refusal(
                lambda: client.infer(
                    "echo", [tensor("x", X.astype(np.int32), "INT32")], headers=BEARER
                )
            ),
            "shape": refusal(
                lambda: client.infer("echo", [tensor("x", X.ravel(), "FP32")], headers=BEARER)
            ),
            "output": refusal(
                lambda: client.infer(
                    "echo", [x], outputs=[triton.InferRequestedOutput("logits")], headers=BEARER
                )
            ),
            "classification": refusal(
                lambda: client.infer(
                    "echo",
                    [x],
                    outputs=[triton.InferRequestedOutput("text", class_count=3)],
                    headers=BEARER,
                )
            ),
            "param": refusal(
                lambda: client.infer("echo", [x], parameters={"colour": "red"}, headers=BEARER)
            ),
            "overloaded": refusal(
                lambda: client.infer("echo", [x], parameters={"fail": "OVERLOADED"}, headers=BEARER)
            ),
            "priority": refusal(
                lambda: client.infer("echo", [x], headers={**BEARER, "x-swarm-priority": "top"})
            ),
            "deadline": refusal(
                lambda: client.infer("slow", [x], client_timeout=0.3, headers=BEARER)
            ),
            "too_large": refusal(  # 9.6 MB: over the port's 8 MiB
                lambda: client.infer("echo", [tensor("x", BIG, "FP32")], headers=BEARER)
            ),
            "still_ready": client.is_model_ready("echo", headers=BEARER),
            "after": client.infer("echo", [x], headers=BEARER).as_numpy("embedding"),
        }

    serving = {"models": ("fake:echo", "fake:slow:3000")}
    async with grpc_swarm(node_factory, token=TOKEN, **serving) as (gateway, server, address):
        got = await with_client(address, calls)
        # The cancelled call's job was stopped on both nodes, not left to run out.
        nodes = (gateway, server)
        await eventually(lambda: not any(n.services.service.in_flight for n in nodes))
    assert got["no_token"] == {
        "status": "StatusCode.UNAUTHENTICATED",
        "message": "this port needs 'authorization: Bearer <token>' metadata",
    }
    assert got["bad_token"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert got["live_without_token"] is True
    assert (
        got["unknown"]
        == got["unknown_metadata"]
        == {
            "status": "StatusCode.NOT_FOUND",
            "message": "no node of this swarm serves the model 'nobody'",
        }
    )
    assert got["version"]["status"] == "StatusCode.NOT_FOUND"
    assert "version 1 only" in got["version"]["message"]
    assert got["dtype"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "BAD_REQUEST: echo: input 'x' has dtype int32, expected float32",
    }
    assert got["shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "shape [6]" in got["shape"]["message"]
    assert got["output"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "echo has no output 'logits'; it gives embedding, text",
    }
    assert got["classification"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "(got classification)" in got["classification"]["message"]
    assert got["param"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "unknown params ['colour']" in got["param"]["message"]
    assert got["overloaded"]["status"] == "StatusCode.RESOURCE_EXHAUSTED"
    assert got["priority"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "x-swarm-priority" in got["priority"]["message"]
    assert got["deadline"]["status"] == "StatusCode.DEADLINE_EXCEEDED"
    assert got["too_large"]["status"] == "StatusCode.RESOURCE_EXHAUSTED"
    assert got["still_ready"] is True and got["after"].shape == (2, 8)


@pytest.mark.slow
async def test_text_as_bytes_to_minilm_embeddings(
    node_factory: NodeFactory, models_dir: Any, tmp_path: Any
) -> None:
    """all-MiniLM-L6-v2 (OpenVINO) on a peer: BYTES in, the same embeddings as a
    libp2p client gets, bit for bit."""
    texts = ["a cat sits on the mat", "a kitten sits on a rug", "stock markets fell today"]
    target = tmp_path / "serving" / "models" / MODEL_NAME
    target.parent.mkdir(parents=True)
    shutil.copytree(models_dir / MODEL_NAME, target, copy_function=os.link)

    def calls(client: Any) -> dict[str, Any]:
        answer = client.infer(MODEL_NAME, [tensor("text", np.array(texts, dtype=object), "BYTES")])
        return {
            "metadata": client.get_model_metadata(MODEL_NAME, as_json=True),
            "embedding": answer.as_numpy("embedding"),
            "tokens": answer.as_numpy("tokens"),
            "outputs": answer.get_response(as_json=True)["outputs"],
        }

    async with (
        grpc_swarm(node_factory, models=(MODEL_NAME,)) as (_, server, address),
        SwarmClient.connect(server.addrs[0]) as direct,
    ):
        got = await with_client(address, calls)
        want = await direct.infer(MODEL_NAME, {"text": texts})
    embedding = want.outputs["embedding"]
    assert isinstance(embedding, Tensor)
    np.testing.assert_array_equal(got["embedding"], embedding.numpy())
    assert got["tokens"].tolist() == [8, 8, 6]
    declared = {o["name"]: o["datatype"] for o in got["metadata"]["outputs"]}
    assert {o["name"]: o["datatype"] for o in got["outputs"]} == declared
    assert {i["name"]: i["datatype"] for i in got["metadata"]["inputs"]}["text"] == "BYTES"
    e = got["embedding"]
    cos = e @ e.T / np.outer(np.linalg.norm(e, axis=1), np.linalg.norm(e, axis=1))
    assert cos[0, 1] > cos[0, 2] + 0.2


CONCURRENT = 32
SLOW_S = 1.5


async def test_concurrent_grpc_calls_do_not_stall_the_trio_loop(
    node_factory: NodeFactory,
) -> None:
    """32 gRPC infers in flight at once (each waiting on a slow peer) while the same
    loop answers a libp2p job at once and wakes a ticking task on time."""
    slow = FakeRunner("slow", SLOW_S, concurrency=CONCURRENT)

    def calls(client: Any) -> list[float]:
        def one(i: int) -> float:
            x = np.full((1, 3), float(i), dtype=np.float32)
            answer = client.infer("slow", [tensor("x", x, "FP32")], client_timeout=TIMEOUT_S)
            return float(answer.as_numpy("embedding")[0, 0])

        with ThreadPoolExecutor(CONCURRENT) as pool:
            return list(pool.map(one, range(CONCURRENT)))

    lags: list[float] = []

    async def tick(stop: trio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await trio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    async with (
        grpc_swarm(node_factory, runners=[slow], models=()) as (_, server, address),
        node_factory("local", models=("fake:echo",)) as local,
        SwarmClient.connect(local.addrs[0]) as client,
    ):
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick, stop)
            answers: list[list[float]] = []

            async def run_calls() -> None:
                answers.append(await with_client(address, calls))

            nursery.start_soon(run_calls)
            await eventually(lambda: server.services.service.in_flight == CONCURRENT, 10)
            started = time.monotonic()
            answer = await client.infer("echo", {"text": "while they run"})
            took = time.monotonic() - started
            in_flight_after = server.services.service.in_flight
            await eventually(lambda: bool(answers), TIMEOUT_S)
            stop.set()
    print(f"libp2p job in {1000 * took:.1f} ms, the loop late by {1000 * max(lags):.1f} ms at most")
    text = answer.outputs["text"]
    assert isinstance(text, str) and len(text.split()) == 3  # FakeRunner's three words
    # A handler that waited for its job on the trio thread would hold the loop for a
    # whole job (SLOW_S); what is left is the GIL shared with 64 threads of grpcio and
    # the client on a busy machine (tens of ms, 0.2 s at load 5 on 2 cores).
    assert took < SLOW_S / 3 and in_flight_after == CONCURRENT  # answered while 32 waited
    assert answers[0] == [2.0 * 3 * i for i in range(CONCURRENT)]  # each its own answer
    assert max(lags) < SLOW_S / 3, f"the loop stalled for {max(lags):.3f} s"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other program listens on, for the test's length."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_busy_port_falls_back_only_when_allowed(
    node_factory: NodeFactory, busy_port: int
) -> None:
    """grpcio would share a busy port (SO_REUSEPORT) by default: here it is busy."""
    config = GrpcConfig(port=busy_port)
    fake = ("fake:echo",)
    async with node_factory("fallback", models=fake, grpc=config, grpc_fallback=True) as node:
        assert node.services.grpc is not None
        address = node.services.grpc.address
        assert address.startswith("127.0.0.1:") and not address.endswith(f":{busy_port}")
        state = read_state(node.config.data_dir)
        assert state is not None and state["grpc"] == address  # where clients find it
        assert await with_client(address, lambda c: c.is_model_ready("echo")) is True

    with pytest.raises(BaseException) as raised:  # a group from the nursery; its member below
        async with node_factory("strict", models=fake, grpc=config) as _:
            pass
    error = sole_error(raised.value)
    assert isinstance(error, ConfigError), repr(raised.value)
    assert str(error) == f"gRPC port: 127.0.0.1:{busy_port} is in use (--grpc HOST:PORT or off)"


async def test_stopping_node_finishes_calls_in_flight_then_refuses(
    node_factory: NodeFactory,
) -> None:
    """A call in flight when the node begins to stop is answered within the grace
    period; the port then refuses calls, and the node's run returns."""
    slow = FakeRunner("slow", 1.0)
    x = np.ones((1, 3), dtype=np.float32)
    async with node_factory(
        "alone", models=(), runners=[slow], grpc=GrpcConfig(), shutdown_grace_s=5.0
    ) as node:
        assert node.services.grpc is not None
        address = node.services.grpc.address
        answers: list[Any] = []

        async def call() -> None:
            one = await with_client(address, lambda c: c.infer("slow", [tensor("x", x, "FP32")]))
            answers.append(one.as_numpy("embedding"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await eventually(lambda: node.services.service.in_flight == 1)
            node.stop()
    assert answers and answers[0].shape == (1, 8)
    after = await with_client(address, lambda c: refusal(c.is_server_live))
    assert after["status"] == "StatusCode.UNAVAILABLE"


async def test_verified_jobs_say_how_the_copies_compared_in_trailing_metadata(
    node_factory: NodeFactory,
) -> None:
    """``x-swarm-verify: 1`` runs the job on one more node; the verdict comes back as
    trailing metadata named as the HTTP response headers."""
    from tritonclient.grpc import service_pb2

    flat = X.ravel().tolist()

    def call(address: str, metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
        with grpc.insecure_channel(address) as channel:
            infer = channel.unary_unary(
                INFER,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            request = typed_request("FP32", [2, 3], fp32_contents=flat)
            _, done = infer.with_call(request, timeout=TIMEOUT_S, metadata=metadata)
            return dict(done.trailing_metadata() or ())

    async with (
        node_factory("one", models=("fake:echo",)) as one,
        node_factory("two", models=("fake:echo",), peers=(one.addrs[0],)) as two,
        node_factory(
            "gateway", models=(), peers=(one.addrs[0], two.addrs[0]), grpc=GrpcConfig()
        ) as gateway,
    ):
        assert gateway.services.grpc is not None
        address = gateway.services.grpc.address
        table = gateway.services.membership
        await eventually(lambda: len(list(live_peers(table.table))) == 2)
        verified = await trio.to_thread.run_sync(call, address, (("x-swarm-verify", "1"),))
        plain = await trio.to_thread.run_sync(call, address, ())
    assert verified["x-swarm-verify-verdict"] == "agree"
    assert set(verified["x-swarm-verify-nodes"].split(",")) == {one.peer_id, two.peer_id}
    assert "x-swarm-verify-verdict" not in plain
