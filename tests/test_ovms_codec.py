"""The KServe v2 and TF-Serving codecs: round trips, and every malformed answer refused.

Pure functions, no server: tensors of every dtype and shape survive encode ->
JSON -> decode (hypothesis); a table of broken answers each raise
BackendGarbage; metadata becomes the input specs the node checks.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols import Tensor
from runners.base import TEXT, OutputSpec, TensorSpec, TextSpec
from runners.remote import kserve_v2, tfserving
from runners.remote.errors import BackendGarbage

DTYPES = sorted(kserve_v2.DTYPE_TO_V2)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    elements = None
    if dtype.kind == "f":
        elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=150, deadline=None)
@given(arrays())
def test_kserve_tensor_round_trip(array: np.ndarray[Any, Any]) -> None:
    sent = kserve_v2.encode_tensor("t", Tensor.from_numpy(array))
    assert sent["datatype"] == kserve_v2.DTYPE_TO_V2[array.dtype.name]
    wire = json.loads(json.dumps(sent))  # what a server echoing it would send
    name, value = kserve_v2.decode_tensor(wire, "test")
    assert name == "t" and isinstance(value, Tensor)
    assert value.dtype == array.dtype.name and value.shape == array.shape
    np.testing.assert_array_equal(value.numpy(), array)


@settings(max_examples=100, deadline=None)
@given(arrays())
def test_tfserving_columnar_round_trip(array: np.ndarray[Any, Any]) -> None:
    body = tfserving.encode_columnar({"t": Tensor.from_numpy(array)})
    answer = {"outputs": json.loads(json.dumps(body))["inputs"]}
    outputs = tfserving.decode_predict(answer, "test", outputs={"t": array.dtype.name})
    value = outputs["t"]
    assert isinstance(value, Tensor) and value.dtype == array.dtype.name
    np.testing.assert_array_equal(value.numpy().reshape(array.shape), array)


@settings(max_examples=100, deadline=None)
@given(st.lists(arrays(), min_size=1, max_size=3), st.lists(st.text(max_size=5), max_size=3))
def test_kserve_binary_round_trip(arrays_: list[np.ndarray[Any, Any]], texts: list[str]) -> None:
    """A binary request read back as an answer gives every tensor and text unchanged."""
    inputs: dict[str, Any] = {f"t{i}": Tensor.from_numpy(a) for i, a in enumerate(arrays_)}
    inputs["s"] = texts
    body, length = kserve_v2.encode_binary_request(inputs, request_id="r1")
    header = json.loads(body[:length])
    assert header["parameters"] == {"binary_data_output": True}
    assert all("data" not in item for item in header["inputs"])
    answer = json.dumps({"id": "r1", "outputs": header["inputs"]}).encode() + body[length:]
    outputs = kserve_v2.decode_binary_response(answer, "test", expect=inputs, request_id="r1")
    assert outputs["s"] == texts
    for i, array in enumerate(arrays_):
        got = outputs[f"t{i}"]
        assert isinstance(got, Tensor) and got.dtype == array.dtype.name
        np.testing.assert_array_equal(got.numpy(), array)


def _binary_answer(outputs: list[dict[str, Any]], blob: bytes) -> bytes:
    return json.dumps({"outputs": outputs}).encode() + blob


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (
            _binary_answer(
                [
                    {
                        **{"name": "y", "datatype": "FP32", "shape": [2]},
                        "parameters": {"binary_data_size": 8},
                    }
                ],
                b"\0" * 4,
            ),
            "binary bytes",
        ),
        (
            _binary_answer(
                [
                    {
                        "name": "y",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 4},
                    }
                ],
                b"\0" * 4,
            ),
            "4 bytes for FP32",
        ),
        (
            _binary_answer(
                [
                    {
                        "name": "y",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ],
                b"\0" * 6,
            ),
            "belong to no",
        ),
        (
            _binary_answer(
                [
                    {
                        "name": "y",
                        "datatype": "BOOL",
                        "shape": [1],
                        "parameters": {"binary_data_size": 1},
                    }
                ],
                b"\x02",
            ),
            "BOOL bytes",
        ),
        (
            _binary_answer(
                [
                    {
                        "name": "y",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 6},
                    }
                ],
                b"\x09\0\0\0ab",
            ),
            "runs past",
        ),
        (
            _binary_answer(
                [
                    {
                        "name": "y",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": -4},
                    }
                ],
                b"",
            ),
            "not a size",
        ),
        (b"\xff\x00 not json", "does not start with a JSON header"),
    ],
)
def test_kserve_bad_binary_answers_are_garbage(answer: bytes, why: str) -> None:
    with pytest.raises(BackendGarbage, match=why):
        kserve_v2.decode_binary_response(answer, "test")


def test_kserve_nested_data_and_bytes_are_read() -> None:
    _, nested = kserve_v2.decode_tensor(
        {"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}, "t"
    )
    assert isinstance(nested, Tensor) and nested.numpy().tolist() == [[1, 2], [3, 4]]
    _, text = kserve_v2.decode_tensor(
        {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ab", "cd"]}, "t"
    )
    assert text == ["ab", "cd"]
    assert kserve_v2.encode_tensor("s", ["x", "y"]) == {
        "name": "s",
        "shape": [2],
        "datatype": "BYTES",
        "data": ["x", "y"],
    }


GOOD = {"name": "y", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"datatype": "FP8"}, "unknown datatype"),
        ({"datatype": "BF16"}, "unknown datatype"),
        ({"shape": [3]}, "2 values for shape [3]"),
        ({"shape": [-1]}, "not a list of sizes"),
        ({"shape": "2"}, "not a list of sizes"),
        ({"shape": [1] * 9}, "not a list of sizes"),
        ({"data": "1,2"}, "no 'data' list"),
        ({"data": [1.0, "2"]}, "kind values"),
        ({"data": [1.0, None]}, "kind values"),
        ({"data": [[1.0], [2.0, 3.0]]}, "regular array"),
        ({"datatype": "INT8", "data": [1, 300]}, "out of range"),
        ({"datatype": "INT32", "data": [1.5, 2.0]}, "kind values"),
        ({"datatype": "BOOL", "data": [1, 0]}, "kind values"),
        ({"datatype": "BYTES", "data": ["a", 2]}, "BYTES data holds"),
        ({"name": ""}, "'name'"),
    ],
)
def test_kserve_bad_tensors_are_garbage(change: dict[str, Any], why: str) -> None:
    with pytest.raises(BackendGarbage, match=why.replace("[", r"\[").replace("]", r"\]")):
        kserve_v2.decode_tensor({**GOOD, **change}, "test")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ([], "expected a JSON object"),
        ({"outputs": {}}, "'outputs' is not a list"),
        ({"outputs": []}, r"outputs \['y'\] missing"),
        ({"outputs": [GOOD, GOOD]}, "appears twice"),
        ({"id": "other", "outputs": [GOOD]}, "answer to request 'other'"),
    ],
)
def test_kserve_bad_responses_are_garbage(body: Any, why: str) -> None:
    with pytest.raises(BackendGarbage, match=why):
        kserve_v2.decode_response(body, "test", expect=["y"], request_id="mine")


def test_kserve_metadata_becomes_specs() -> None:
    meta = kserve_v2.parse_metadata(
        {
            "name": "m",
            "versions": ["1", "2"],
            "platform": "OpenVINO",
            "inputs": [
                {"name": "image", "datatype": "FP32", "shape": [-1, 224, 224, 3]},
                {"name": "prompt", "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": "p", "datatype": "FP16", "shape": [-1, 2]},
                {"name": "labels", "datatype": "BYTES", "shape": [-1, 2]},
                {"name": "one", "datatype": "BYTES", "shape": [2, 3]},
            ],
        },
        "test",
    )
    assert meta.versions == ("1", "2")
    # BYTES are decoded into one flat list of strings, whatever their shape.
    assert kserve_v2.output_specs(meta) == (
        OutputSpec("p", "float16", (None, 2)),
        OutputSpec("labels", TEXT, (None,)),
        OutputSpec("one", TEXT, (6,)),
    )
    assert kserve_v2.input_specs(meta, max_items=4, max_chars=10) == (
        TensorSpec("image", frozenset({"float32"}), (None, 224, 224, 3)),
        TextSpec("prompt", max_items=4, max_chars=10),
    )
    for broken in (
        {"name": "m", "inputs": [{"name": "a", "datatype": "X", "shape": []}], "outputs": []},
        {"name": "m", "inputs": [{"name": "a", "datatype": "FP32", "shape": [-2]}], "outputs": []},
        {"name": "m", "inputs": [], "outputs": None},
        {"inputs": [], "outputs": []},
    ):
        with pytest.raises(BackendGarbage):
            kserve_v2.parse_metadata(broken, "test")


def test_kserve_paths_quote_names() -> None:
    assert kserve_v2.infer_path("a/b c", "2") == "/v2/models/a%2Fb%20c/versions/2/infer"
    assert kserve_v2.ready_path("m") == "/v2/models/m/ready"
    assert tfserving.predict_path("m", "3") == "/v1/models/m/versions/3:predict"
    assert tfserving.metadata_path("m") == "/v1/models/m/metadata"


def test_tfserving_rows_and_answers() -> None:
    x = Tensor.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    body = tfserving.encode_rows({"x": x}, "serving_default")
    assert body == {
        "instances": [{"x": [0.0, 1.0, 2.0]}, {"x": [3.0, 4.0, 5.0]}],
        "signature_name": "serving_default",
    }
    # Row answers: a list of objects, or plain rows for a single output.
    named = tfserving.decode_predict({"predictions": [{"y": [1, 2]}, {"y": [3, 4]}]}, "t")
    plain = tfserving.decode_predict({"predictions": [[1.5], [2.5]]}, "t", outputs={"y": "float16"})
    assert isinstance(named["y"], Tensor) and named["y"].dtype == "int64"
    assert named["y"].numpy().tolist() == [[1, 2], [3, 4]]
    assert isinstance(plain["y"], Tensor) and plain["y"].dtype == "float16"
    with pytest.raises(ValueError, match="one batch size"):
        tfserving.encode_rows({"x": x, "z": Tensor.from_numpy(np.zeros((3, 1), np.float32))})


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({}, "neither 'predictions' nor 'outputs'"),
        ({"predictions": {"y": 1}}, "not a list"),
        ({"predictions": [{"y": 1}, {"z": 2}]}, "different outputs"),
        ({"outputs": {"z": [1.0]}}, r"outputs \['y'\] missing"),
        ({"outputs": {"y": [[1.0], [2.0, 3.0]]}}, "regular array"),
        ({"outputs": {"y": [1.5]}, "x": 1}, None),
        ({"outputs": {"y": [None]}}, "'O'-kind values"),
        ({"outputs": {"y": [{"a": 1}]}}, "'O'-kind values"),
    ],
)
def test_tfserving_bad_answers_are_garbage(body: Any, why: str | None) -> None:
    if why is None:
        tfserving.decode_predict(body, "t", outputs={"y": "float32"})
        return
    with pytest.raises(BackendGarbage, match=why):
        tfserving.decode_predict(body, "t", outputs={"y": "float32"})
    with pytest.raises(BackendGarbage, match="kind values"):
        tfserving.decode_predict({"outputs": {"y": [1.5]}}, "t", outputs={"y": "int32"})


def test_tfserving_status_metadata_and_config() -> None:
    statuses = tfserving.parse_model_status(
        {
            "model_version_status": [
                {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK"}},
                {"version": 1, "state": "END", "status": {}},
            ]
        },
        "t",
    )
    assert [(s.version, s.state) for s in statuses] == [("2", "AVAILABLE"), ("1", "END")]
    # TF-Serving's own snake_case metadata reads like OVMS's camelCase.
    sig = tfserving.parse_metadata(
        {
            "model_spec": {"name": "m"},
            "metadata": {
                "signature_def": {
                    "signature_def": {
                        "serving_default": {
                            "inputs": {
                                "ids": {
                                    "dtype": "DT_INT64",
                                    "tensor_shape": {"dim": [{"size": "-1"}]},
                                }
                            },
                            "outputs": {"s": {"dtype": "DT_STRING", "tensor_shape": {}}},
                        }
                    }
                }
            },
        },
        "t",
    )
    assert tfserving.input_specs(sig, max_items=2, max_chars=3) == (
        TensorSpec("ids", frozenset({"int64"}), (None,)),
    )
    assert sig.outputs == {"s": ("text", ())}
    assert tfserving.output_specs(sig) == (OutputSpec("s", TEXT, (1,)),)  # a lone string
    config = tfserving.parse_config_status({"a": {"model_version_status": []}}, "t")
    assert config == {"a": ()}
    for broken in ({"model_version_status": [{"state": "AVAILABLE"}]}, {"x": 1}, []):
        with pytest.raises(BackendGarbage):
            tfserving.parse_model_status(broken, "t")
