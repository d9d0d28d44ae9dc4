"""KServe v2 (Open Inference Protocol) REST routes, for Triton/KServe/OVMS clients.

Inputs arrive as v2 JSON tensors and are read with the same sans-IO codec the
KServe v2 runner uses on answers (``runners.remote.kserve_v2``): one datatype
table, one set of checks (known datatype, shape of small sizes, data count and
value kinds matching). ``BYTES`` inputs become text (a list of strings). The
request's ``parameters`` become swarm params. Outputs go back the same way;
scalar outputs (token counts, say) become one-element tensors. Model metadata
comes from the model's description in the capability records: its inputs with
datatype and shape (-1: any size); outputs are not declared by swarm runners.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocols import Param, Request, Tensor, Value
from runners.remote.errors import BackendGarbage
from runners.remote.kserve_v2 import BYTES, DTYPE_TO_V2, decode_tensor, encode_tensor

from .app import Backend, find_model, guarded, json_object, new_id, options, read_json
from .config import GatewayConfig
from .errors import HTTPFailure

VERSION = "1"


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
        model = find_model(backend, request.path_params["model"])
        return JSONResponse(
            {
                "name": model["name"],
                "versions": [VERSION],
                "platform": f"swarm-{model.get('runner', 'unknown')}",
                "inputs": [_input_meta(spec) for spec in model.get("inputs") or []],
                "outputs": [],
            }
        )

    @guard
    async def model_ready(request: HTTPRequest) -> Response:
        model = find_model(backend, request.path_params["model"])
        return JSONResponse({"name": model["name"], "ready": True})

    @guard
    async def infer(request: HTTPRequest) -> Response:
        body = json_object(await read_json(request, config.max_body))
        model = find_model(backend, request.path_params["model"])
        inputs = _inputs(body.get("inputs"))
        params = _parameters(body.get("parameters"))
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
        )
        result = await backend.execute(job, _no_chunks)
        wanted = _wanted(body.get("outputs"))
        outputs = [
            _output(name, value)
            for name, value in result.outputs.items()
            if wanted is None or name in wanted
        ]
        answer: dict[str, Any] = {"model_name": model["name"], "model_version": VERSION}
        if isinstance(rid, str):
            answer["id"] = rid
        return JSONResponse({**answer, "outputs": outputs})

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{model}", metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
    ]


async def _no_chunks(chunk: Mapping[str, Value]) -> None:
    """v2 inference does not stream."""


def _input_meta(spec: Mapping[str, Any]) -> dict[str, Any]:
    if spec.get("kind") == "tensor":
        dtypes = [d for d in spec.get("dtypes", []) if d in DTYPE_TO_V2]
        datatype = DTYPE_TO_V2[dtypes[0]] if dtypes else "FP32"
        return {"name": spec.get("name"), "datatype": datatype, "shape": spec.get("shape", [])}
    return {"name": spec.get("name"), "datatype": BYTES, "shape": [-1]}


def _inputs(items: Any) -> dict[str, Value]:
    if not isinstance(items, list) or not items:
        raise HTTPFailure(400, "'inputs' must be a non-empty list of tensors", "invalid_input")
    inputs: dict[str, Value] = {}
    for i, item in enumerate(items):
        if isinstance(item, dict) and "parameters" in item and "data" not in item:
            message = f"inputs[{i}]: binary tensor data is not supported"
            raise HTTPFailure(400, message, "invalid_input")
        try:
            name, value = decode_tensor(item, f"inputs[{i}]")
        except BackendGarbage as exc:
            raise HTTPFailure(400, str(exc), "invalid_input") from exc
        if name in inputs:
            raise HTTPFailure(400, f"input {name!r} appears twice", "invalid_input")
        inputs[name] = value
    return inputs


def _parameters(raw: Any) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HTTPFailure(400, "'parameters' must be an object", "invalid_input")
    params: dict[str, Param] = {}
    for key, value in raw.items():
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


def _output(name: str, value: Value) -> dict[str, Any]:
    if isinstance(value, bool):
        value = Tensor.from_numpy(np.array([value]))
    elif isinstance(value, int):
        value = Tensor.from_numpy(np.array([value], dtype=np.int64))
    elif isinstance(value, float):
        value = Tensor.from_numpy(np.array([value], dtype=np.float64))
    try:
        return encode_tensor(name, value)
    except ValueError as exc:
        raise HTTPFailure(500, str(exc), "bad_output") from exc
