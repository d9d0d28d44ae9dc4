"""KServe v2 gRPC messages to and from swarm's values: pure functions, no I/O.

The same protocol as the REST routes (``kserve.py``), in protobuf instead of
JSON, and read with the same checks: a tensor's datatype, shape and data are
those of ``runners.remote.kserve_v2`` (``decode_tensor`` for the typed
``contents`` fields, ``decode_binary_tensor`` for ``raw_input_contents``),
model metadata and parameters those of ``kserve.py``. What the REST routes
and gRPC differ in is said here:

- a tensor's data comes either in the ``contents`` field of its datatype
  (``fp32_contents`` for FP32 ...; FP16 has none) or, for every input at
  once, in ``raw_input_contents`` (tritonclient's default). Data in another
  field than the datatype's, or in both places, is refused;
- outputs go back as ``raw_output_contents`` (little-endian; BYTES as a
  4-byte length then UTF-8, per element), as Triton answers;
- an output asked for by name that the model does not declare, and any
  parameter of an input or an output (shared memory, classification), is
  refused by name: swarm has neither;
- errors are gRPC status codes (``status_of``), with the message a client shows.

Every function raises ``Refused`` for a request it cannot take; the server
turns it into the call's status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from protocols import ErrorCode, Param, SwarmError, Tensor, Value
from runners.remote.errors import BackendGarbage
from runners.remote.kserve_v2 import (
    BYTES,
    DTYPE_TO_V2,
    decode_binary_tensor,
    decode_tensor,
)

from .errors import HTTPFailure
from .kserve import VERSION, as_tensor, input_meta, outputs_meta, parameters, raw_bytes
from .proto import kserve_v2_grpc_pb2 as pb

# The ``InferTensorContents`` field each datatype's data travels in (FP16: raw only).
CONTENTS: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
CONTENT_FIELDS = tuple(sorted(set(CONTENTS.values())))

# Swarm's error codes as gRPC's: what a client retries, and what it does not.
STATUS: Mapping[ErrorCode, grpc.StatusCode] = {
    ErrorCode.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAUTHORIZED: grpc.StatusCode.PERMISSION_DENIED,  # a peer refused this node
    ErrorCode.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorCode.OUTCOME_UNKNOWN: grpc.StatusCode.UNKNOWN,  # it may have run: retry if idempotent
    ErrorCode.NOT_EXECUTED: grpc.StatusCode.UNAVAILABLE,  # it did not run: retry
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}
HTTP_STATUS: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
RETRY_AFTER = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED and UNAVAILABLE


class Refused(Exception):
    """A call answered with ``status`` and ``message`` (and trailing ``metadata``)."""

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.metadata = metadata


def status_of(exc: SwarmError | HTTPFailure) -> Refused:
    """A swarm error, or a refusal the HTTP side shares (``find_model``, ``options``)."""
    if isinstance(exc, HTTPFailure):
        return Refused(HTTP_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message)
    status = STATUS.get(exc.code, grpc.StatusCode.INTERNAL)
    retry_ms = getattr(exc, "retry_after_ms", None)
    metadata = ((RETRY_AFTER, str(retry_ms)),) if isinstance(retry_ms, int) else ()
    return Refused(status, str(exc), metadata)


def check_version(described: Mapping[str, Any], version: str) -> None:
    """NOT_FOUND for a version other than the one swarm serves (empty: that one)."""
    if version and version != VERSION:
        message = f"{described['name']} is served as version {VERSION} only, not {version!r}"
        raise Refused(grpc.StatusCode.NOT_FOUND, message)


def model_metadata(described: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """What the REST route answers for ``GET /v2/models/{m}``, as its message."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    inputs = [
        input_meta(spec) for spec in described.get("inputs") or [] if isinstance(spec, Mapping)
    ]
    return pb.ModelMetadataResponse(
        name=str(described["name"]),
        versions=[VERSION],
        platform=f"swarm-{described.get('runner', 'unknown')}",
        inputs=[
            tensor(name=str(m["name"]), datatype=m["datatype"], shape=m["shape"])
            for m in inputs
            if isinstance(m.get("name"), str)
        ],
        outputs=[tensor(**m) for m in outputs_meta(described.get("outputs"))],
    )


# -- requests --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """An inference request, read: what becomes the swarm ``Request``."""

    model: str
    version: str
    id: str
    inputs: dict[str, Value]
    params: dict[str, Param]
    wanted: tuple[str, ...] | None  # outputs asked for by name; None: every one


def read_request(request: pb.ModelInferRequest) -> Call:
    """The inference request's inputs, parameters and wanted outputs, checked."""
    if not request.model_name:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "give the model's name in model_name")
    if not request.inputs:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "give at least one input tensor")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        message = f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs"
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)
    inputs: dict[str, Value] = {}
    for i, tensor in enumerate(request.inputs):
        name, value = _input(tensor, raw[i] if raw else None, f"inputs[{i}]")
        if name in inputs:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r} appears twice")
        inputs[name] = value
    wanted = None
    if request.outputs:
        for output in request.outputs:
            _no_parameters(output.parameters, f"output {output.name!r}")
        wanted = tuple(o.name for o in request.outputs)
    try:
        params = parameters({k: _parameter(k, v) for k, v in request.parameters.items()})
    except HTTPFailure as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from exc
    return Call(request.model_name, request.model_version, request.id, inputs, params, wanted)


def check_wanted(described: Mapping[str, Any], wanted: Sequence[str] | None) -> None:
    """INVALID_ARGUMENT for an output asked for that the model does not declare (a
    record that declares no outputs, from an older node, is taken at its word later)."""
    declared = {m["name"] for m in outputs_meta(described.get("outputs"))}
    unknown = [name for name in wanted or () if declared and name not in declared]
    if unknown:
        message = (
            f"{described['name']} has no output {unknown[0]!r}; "
            f"it gives {', '.join(sorted(declared))}"
        )
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def _input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, where: str
) -> tuple[str, Value]:
    at = f"{where} ({tensor.name})" if tensor.name else where
    _no_parameters(tensor.parameters, f"input {tensor.name!r}")
    item: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
    }
    given = [f for f in CONTENT_FIELDS if len(getattr(tensor.contents, f))]
    try:
        if raw is not None:
            if given:
                message = f"{at}: data in both raw_input_contents and contents.{given[0]}"
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)
            return decode_binary_tensor(item, raw, where)
        field = CONTENTS.get(tensor.datatype)
        if field is None and tensor.datatype == "FP16":
            message = f"{at}: FP16 data travels in raw_input_contents only"
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)
        if field is not None and any(f != field for f in given):
            other = next(f for f in given if f != field)
            message = f"{at}: {tensor.datatype} data belongs in contents.{field}, not {other}"
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)
        data = list(getattr(tensor.contents, field)) if field is not None else []
        if tensor.datatype == BYTES:
            data = [_text(b, at) for b in data]
        return decode_tensor({**item, "data": data}, where)
    except BackendGarbage as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc


def _text(data: bytes, at: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{at}: a BYTES item is not UTF-8") from exc


def _parameter(key: str, value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"parameter {key!r} has no value")
    return getattr(value, kind)


def _no_parameters(given: Mapping[str, pb.InferParameter], what: str) -> None:
    if given:
        names = ", ".join(sorted(given))
        message = f"{what}: swarm takes no parameters of inputs or outputs (got {names})"
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


# -- answers ---------------------------------------------------------------------------


def infer_response(call: Call, model: str, outputs: Mapping[str, Value]) -> pb.ModelInferResponse:
    """The model's outputs (those asked for, in that order) as raw output contents."""
    names = call.wanted if call.wanted is not None else tuple(outputs)
    missing = [name for name in names if name not in outputs]
    if missing:
        message = f"{model} gave no output {missing[0]!r} (it gave {', '.join(outputs)})"
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)
    answer = pb.ModelInferResponse(model_name=model, model_version=VERSION, id=call.id)
    for name in names:
        value = outputs[name]
        datatype, shape = output_header(name, value)
        answer.outputs.add(name=name, datatype=datatype, shape=shape)
        answer.raw_output_contents.append(raw_bytes(value))
    return answer


def output_header(name: str, value: Value) -> tuple[str, list[int]]:
    """An output's datatype and shape (scalars become one-element tensors, as in REST)."""
    if isinstance(value, bool | int | float):
        value = as_tensor(value)
    if isinstance(value, Tensor):
        if value.dtype not in DTYPE_TO_V2:
            message = f"output {name!r}: dtype {value.dtype} has no KServe v2 datatype"
            raise Refused(grpc.StatusCode.INTERNAL, message)
        return DTYPE_TO_V2[value.dtype], list(value.shape)
    if isinstance(value, str):
        return BYTES, [1]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return BYTES, [len(value)]
    raise Refused(grpc.StatusCode.INTERNAL, f"output {name!r} is neither a tensor nor text")
