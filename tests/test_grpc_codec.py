"""The KServe v2 gRPC messages and their codec, without a server.

The committed Python is what scripts/gen_grpc_proto makes of the .proto today; the
messages are wire-compatible with tritonclient's own copy of the protocol (the same
field numbers and types); and the codec reads and checks requests and writes
answers as the REST routes do (the same datatype table and checks).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from node.gateway import grpc_codec as codec
from node.gateway.grpc_codec import Refused
from node.gateway.proto import kserve_v2_grpc_pb2 as pb
from protocols import ErrorCode, SwarmError, Tensor

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "node" / "gateway" / "proto"


def test_committed_python_is_what_the_generator_makes(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra)")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_grpc_proto"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    for name in ("kserve_v2_grpc_pb2.py", "kserve_v2_grpc_pb2.pyi"):
        assert (tmp_path / name).read_text() == (PROTO / name).read_text(), name


def fields(message: Any) -> dict[str, tuple[int, int]]:
    return {f.name: (f.number, f.type) for f in message.fields}


def test_messages_are_wire_compatible_with_tritonclients() -> None:
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs = service_pb2.DESCRIPTOR.message_types_by_name
    pending = [(ours, theirs[name]) for name, ours in pb.DESCRIPTOR.message_types_by_name.items()]
    checked = 0
    while pending:
        ours, other = pending.pop()
        mine = fields(ours)
        assert {k: fields(other)[k] for k in mine} == mine, ours.full_name
        for nested in ours.nested_types:
            pending.append((nested, other.nested_types_by_name[nested.name]))
        checked += 1
    assert checked == 14 + 4 + 5  # the messages, the tensors inside them, their maps


def request(*inputs: pb.ModelInferRequest.InferInputTensor, raw: list[bytes] | None = None) -> Any:
    return pb.ModelInferRequest(model_name="m", inputs=inputs, raw_input_contents=raw or [])


def tensor(name: str, datatype: str, shape: list[int], **contents: Any) -> Any:
    given = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(given.contents, field).extend(values)
    return given


def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(Refused) as raised:
        call()
    return raised.value.status, raised.value.message


def test_raw_and_typed_inputs_read_alike() -> None:
    x = np.arange(6, dtype=np.int16).reshape(2, 3)
    words = ["a", "bé"]
    blob = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    raw = codec.read_request(
        request(tensor("x", "INT16", [2, 3]), tensor("t", "BYTES", [2]), raw=[x.tobytes(), blob])
    )
    typed = codec.read_request(
        request(
            tensor("x", "INT16", [2, 3], int_contents=x.ravel().tolist()),
            tensor("t", "BYTES", [2], bytes_contents=[w.encode() for w in words]),
        )
    )
    for call in (raw, typed):
        got = call.inputs["x"]
        assert isinstance(got, Tensor) and got.dtype == "int16"
        np.testing.assert_array_equal(got.numpy(), x)
        assert call.inputs["t"] == words
    assert raw.wanted is None and raw.params == {}


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda: request(tensor("x", "FP32", [1]), raw=[b"\0" * 4, b""]), "2 raw_input_contents"),
        (
            lambda: request(tensor("x", "FP32", [1], fp32_contents=[1.0]), raw=[b"\0" * 4]),
            "both raw_input_contents and contents.fp32_contents",
        ),
        (lambda: request(tensor("x", "FP32", [2]), raw=[b"\0" * 4]), "4 bytes for FP32"),
        (lambda: request(tensor("x", "BOOL", [1]), raw=[b"\2"]), "BOOL bytes other than 0 and 1"),
        (
            lambda: request(tensor("x", "FP32", [1], fp32_contents=[1]), tensor("x", "FP32", [0])),
            "input 'x' appears twice",
        ),
        (
            lambda: request(tensor("t", "BYTES", [1], bytes_contents=[b"\xff"])),
            "a BYTES item is not UTF-8",
        ),
        (lambda: request(tensor("x", "FP32", [-1], fp32_contents=[1.0])), "is not a list of sizes"),
        (lambda: pb.ModelInferRequest(model_name="m"), "give at least one input tensor"),
    ],
)
def test_bad_inputs_are_invalid_arguments(build: Any, says: str) -> None:
    status, message = refused(lambda: codec.read_request(build()))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and says in message, message


def test_parameters_become_swarm_params_and_unset_ones_are_refused() -> None:
    given = request(tensor("x", "FP32", [1], fp32_contents=[1.0]))
    given.parameters["k"].int64_param = 3
    given.parameters["greedy"].bool_param = True
    given.parameters["stop"].string_param = "."
    given.parameters["t"].double_param = 0.5
    assert codec.read_request(given).params == {"k": 3, "greedy": True, "stop": ".", "t": 0.5}
    given.parameters["empty"].Clear()
    given.parameters["empty"].SetInParent()
    status, message = refused(lambda: codec.read_request(given))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "'empty' has no value" in message


def test_answers_are_raw_outputs_in_the_order_asked() -> None:
    call = codec.Call("m", "", "r-1", {}, {}, wanted=("n", "e"))
    e = Tensor.from_numpy(np.ones((2, 2), dtype=np.float32))
    answer = codec.infer_response(call, "m", {"e": e, "n": 3, "t": ["é"]})
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [
        ("n", "INT64", [1]),
        ("e", "FP32", [2, 2]),
    ]
    assert answer.raw_output_contents[0] == struct.pack("<q", 3)
    assert answer.raw_output_contents[1] == np.ones(4, dtype="<f4").tobytes()
    assert (answer.id, answer.model_version) == ("r-1", "1")
    every = codec.infer_response(codec.Call("m", "", "", {}, {}, None), "m", {"t": ["é", "b"]})
    assert every.raw_output_contents[0] == b"\2\0\0\0\xc3\xa9\1\0\0\0b"
    status, _ = refused(lambda: codec.infer_response(call, "m", {"e": e}))
    assert status == grpc.StatusCode.INVALID_ARGUMENT


def test_every_swarm_error_code_has_a_grpc_status() -> None:
    assert set(codec.STATUS) == set(ErrorCode)

    class Overloaded(SwarmError):
        code = ErrorCode.OVERLOADED
        retry_after_ms = 250

    refusal = codec.status_of(Overloaded("busy"))
    assert refusal.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.metadata == (("retry-after-ms", "250"),)
