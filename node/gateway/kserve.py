"""KServe v2 (Open Inference Protocol) REST routes, for Triton/KServe/OVMS clients.

Inputs arrive as v2 JSON tensors and are read with the same sans-IO codec the
KServe v2 runner uses on answers (``runners.remote.kserve_v2``): one datatype
table, one set of checks (known datatype, shape of small sizes, data count and
value kinds matching). ``BYTES`` inputs become text (a list of strings). The
request's ``parameters`` become swarm params. Outputs go back the same way;
scalar outputs (token counts, say) become one-element tensors. Model metadata
comes from the model's description in the capability records: its inputs and
outputs (``runners.base.OutputSpec``) with datatype and shape (-1: any size).

The binary tensor extension works both ways, as KServe and Triton clients use
it by default: a request whose JSON header length is in
``Inference-Header-Content-Length`` carries inputs with
``parameters.binary_data_size`` as raw little-endian bytes after the header
(BYTES: a 4-byte length then UTF-8, per item); outputs come back the same way
when the request sets ``parameters.binary_data_output`` (all) or an output's
``parameters.binary_data`` (that one).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocols import Param, Request, Tensor, Value
from protocols.tensors import MAX_NDIM
from runners.remote.errors import BackendGarbage
from runners.remote.kserve_v2 import (
    BYTES,
    DTYPE_TO_V2,
    HEADER_LENGTH,
    decode_binary_tensor,
    decode_tensor,
    encode_tensor,
)

from .app import (
    Backend,
    find_model,
    guarded,
    json_object,
    new_id,
    options,
    parse_json,
    read_body,
    run_while_connected,
    verify_headers,
)
from .config import GatewayConfig
from .errors import HTTPFailure

VERSION = "1"
PROTOCOL_PARAMETERS = frozenset({"binary_data_output"})  # the extension's, not the model's


def routes(backend: Backend, config: GatewayConfig) -> list[Route]:
    guard, public = guarded(config), guarded(config, public=True)

    @public
    async def live(request: HTTPRequest) -> Response:
        return JSONResponse({"live": True})

    @public
    async def ready(request: HTTPRequest) -> Response:
        return JSONResponse({"ready": True})

    @guard
    async def metadata(request: HTTPRequest) -> Response:
        model = _model(backend, request)
        return JSONResponse(
            {
                "name": model["name"],
                "versions": [VERSION],
                "platform": f"swarm-{model.get('runner', 'unknown')}",
                "inputs": [input_meta(spec) for spec in model.get("inputs") or []],
                "outputs": outputs_meta(model.get("outputs")),
            }
        )

    @guard
    async def model_ready(request: HTTPRequest) -> Response:
        model = _model(backend, request)
        return JSONResponse({"name": model["name"], "ready": True})

    @guard
    async def infer(request: HTTPRequest) -> Response:
        data = await read_body(request, config.max_body)
        body, blob = _split(data, request.headers.get(HEADER_LENGTH))
        model = _model(backend, request)
        inputs = _inputs(body.get("inputs"), blob)
        params = parameters(body.get("parameters"))
        rid = body.get("id")
        ident = rid if isinstance(rid, str) and 0 < len(rid) <= 128 else new_id("v2")
        how = options(request)
        job = Request(
            id=ident,
            model=model["name"],
            inputs=inputs,
            params=params,
            deadline_ms=how.deadline_ms,
            priority=how.priority,
            hedge_ms=how.hedge_ms,
            verify=how.verify,
        )
        result = await run_while_connected(backend, request, job)
        wanted = _wanted(body.get("outputs"))
        binary = _binary_outputs(body)
        outputs, blobs = [], []
        for name, value in result.outputs.items():
            if wanted is not None and name not in wanted:
                continue
            item = _output(name, value)
            if name in binary or "*" in binary:
                blob = raw_bytes(value)
                del item["data"]
                item["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            outputs.append(item)
        answer: dict[str, Any] = {"model_name": model["name"], "model_version": VERSION}
        if isinstance(rid, str):
            answer["id"] = rid
        verified = verify_headers([result.meta])
        if not blobs:
            return JSONResponse({**answer, "outputs": outputs}, headers=verified)
        head = json.dumps({**answer, "outputs": outputs}, separators=(",", ":")).encode()
        return Response(
            head + b"".join(blobs),
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(head)), **verified},
        )

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{model}", metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        # The same, pinned to a version: swarm serves one version of each model.
        Route("/v2/models/{model}/versions/{version}", metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def _model(backend: Backend, request: HTTPRequest) -> Mapping[str, Any]:
    """The model the path names; 404 for a version other than the one served."""
    model = find_model(backend, request.path_params["model"])
    version = request.path_params.get("version")
    if version is not None and version != VERSION:
        message = f"{model['name']} is served as version {VERSION} only, not {version!r}"
        raise HTTPFailure(404, message, "model_version_not_found")
    return model


def input_meta(spec: Mapping[str, Any]) -> dict[str, Any]:
    if spec.get("kind") == "tensor":
        dtypes = [d for d in spec.get("dtypes", []) if d in DTYPE_TO_V2]
        datatype = DTYPE_TO_V2[dtypes[0]] if dtypes else "FP32"
        return {"name": spec.get("name"), "datatype": datatype, "shape": spec.get("shape", [])}
    return {"name": spec.get("name"), "datatype": BYTES, "shape": [-1]}


def outputs_meta(described: Any) -> list[dict[str, Any]]:
    """The outputs a record declares (``ModelInfo.describe``), as v2 metadata. A peer's
    record is data from afar: entries that do not read are left out, and a record
    from before outputs were declared (none, or a text) declares none."""
    if not isinstance(described, list):
        return []
    metas = []
    for spec in described:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            continue
        shape = spec.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= -1 for d in shape)
        ):
            continue
        if spec.get("kind") == "text":
            datatype = BYTES
        elif spec.get("kind") == "tensor" and spec.get("dtype") in DTYPE_TO_V2:
            datatype = DTYPE_TO_V2[spec["dtype"]]
        else:
            continue
        metas.append({"name": spec["name"], "datatype": datatype, "shape": list(shape)})
    return metas


def _split(data: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON header, the binary tensor bytes after it)."""
    if header_length is None:
        return json_object(parse_json(data)), b""
    if not header_length.isdigit() or int(header_length) > len(data):
        message = f"{HEADER_LENGTH} {header_length!r} is not a length within the body"
        raise HTTPFailure(400, message, "invalid_header")
    size = int(header_length)
    return json_object(parse_json(data[:size])), data[size:]


def _inputs(items: Any, blob: bytes) -> dict[str, Value]:
    if not isinstance(items, list) or not items:
        raise HTTPFailure(400, "'inputs' must be a non-empty list of tensors", "invalid_input")
    inputs: dict[str, Value] = {}
    offset = 0
    for i, item in enumerate(items):
        at = f"inputs[{i}]"
        params = item.get("parameters") if isinstance(item, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        try:
            if size is None:
                name, value = decode_tensor(item, at)
            elif type(size) is not int or not 0 <= size <= len(blob) - offset:
                message = f"{at}: binary_data_size {size!r}, {len(blob) - offset} bytes left"
                raise HTTPFailure(400, message, "invalid_input")
            else:
                name, value = decode_binary_tensor(item, blob[offset : offset + size], at)
                offset += size
        except BackendGarbage as exc:
            raise HTTPFailure(400, str(exc), "invalid_input") from exc
        if name in inputs:
            raise HTTPFailure(400, f"input {name!r} appears twice", "invalid_input")
        inputs[name] = value
    if offset != len(blob):
        message = f"{len(blob) - offset} binary bytes belong to no input"
        raise HTTPFailure(400, message, "invalid_input")
    return inputs


def _binary_outputs(body: Mapping[str, Any]) -> set[str]:
    """Outputs to send as raw bytes: ``*`` for all."""
    params = body.get("parameters")
    every = isinstance(params, dict) and params.get("binary_data_output") is True
    named = {
        str(o.get("name"))
        for o in body.get("outputs") or []
        if isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data") is True
    }
    return named | ({"*"} if every else set())


def raw_bytes(value: Value) -> bytes:
    """One output's bytes for the binary extension (little-endian; BYTES length-prefixed)."""
    if isinstance(value, Tensor):
        array = value.numpy()
        return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return b"".join(struct.pack("<I", len(raw)) + raw for raw in (s.encode() for s in value))
    return raw_bytes(as_tensor(value))


def parameters(raw: Any) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HTTPFailure(400, "'parameters' must be an object", "invalid_input")
    params: dict[str, Param] = {}
    for key, value in raw.items():
        if key in PROTOCOL_PARAMETERS:
            continue
        if value is None or isinstance(value, str | int | float | bool):
            params[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            params[key] = list(value)
        else:
            raise HTTPFailure(400, f"parameter {key!r} is not a scalar", "invalid_input")
    return params


def _wanted(raw: Any) -> set[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and "name" in o for o in raw):
        raise HTTPFailure(400, "'outputs' must be a list of {name}", "invalid_input")
    return {str(o["name"]) for o in raw}


def as_tensor(value: bool | int | float) -> Tensor:
    """A scalar output as a one-element tensor."""
    if isinstance(value, bool):
        return Tensor.from_numpy(np.array([value]))
    if isinstance(value, int):
        return Tensor.from_numpy(np.array([value], dtype=np.int64))
    return Tensor.from_numpy(np.array([value], dtype=np.float64))


def _output(name: str, value: Value) -> dict[str, Any]:
    if isinstance(value, bool | int | float):
        value = as_tensor(value)
    try:
        return encode_tensor(name, value)
    except ValueError as exc:
        raise HTTPFailure(500, str(exc), "bad_output") from exc
