"""The KServe v2 REST protocol (OVMS's ``/v2`` API) as pure functions: no I/O.

OpenVINO Model Server, Triton and kserve all speak it. A runner builds paths
and bodies here, moves them with an ``Endpoint``, and hands the answers back
here to be checked. Everything a server sends is validated before it becomes
a ``Tensor``: a datatype outside the closed set, a shape that is not a list of
small non-negative integers, data whose count does not match the shape or
whose values are not of the datatype's kind, a missing or repeated output:
each raises ``BackendGarbage`` naming what was wrong. Numeric tensors travel
as JSON lists (row-major, flat or nested); ``BYTES`` tensors as strings.

The binary tensor extension is supported both ways (``encode_binary_request``,
``decode_binary_response``): a JSON header, its length in the
``Inference-Header-Content-Length`` header, then each tensor's raw
little-endian bytes (BYTES: 4-byte little-endian length, then UTF-8, per item)
in header order, each sized by its ``parameters.binary_data_size``. An answer's
header length is found by parsing it, so the caller needs no response headers.

Datatype names (the v2 spec's): BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32,
FP64 map one to one onto swarm's tensor dtypes; BYTES maps onto text (a
string or a list of strings). BF16 has no swarm dtype and is refused.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from protocols import Tensor, Value, bounded_json
from protocols.tensors import MAX_NDIM

from ..base import TEXT, InputSpec, OutputSpec, TensorSpec, TextSpec
from .errors import BackendGarbage

V2_DTYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
DTYPE_TO_V2: Mapping[str, str] = {v: k for k, v in V2_DTYPES.items()}
BYTES = "BYTES"
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**31
# numpy kinds a JSON value list may parse to, per swarm dtype kind.
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One input or output as model metadata declares it; -1 in ``shape`` is any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


# -- paths ---------------------------------------------------------------------------


def model_path(model: str, version: str | None = None) -> str:
    """``/v2/models/{m}`` or ``/v2/models/{m}/versions/{v}``, each part URL-quoted."""
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return path


def ready_path(model: str, version: str | None = None) -> str:
    return model_path(model, version) + "/ready"


def infer_path(model: str, version: str | None = None) -> str:
    return model_path(model, version) + "/infer"


SERVER_LIVE = "/v2/health/live"
SERVER_READY = "/v2/health/ready"


# -- metadata ------------------------------------------------------------------------


def parse_metadata(body: Any, where: str) -> ModelMetadata:
    """A model metadata answer (``GET /v2/models/{m}``), checked."""
    obj = _object(body, where)
    versions = obj.get("versions") or []
    if not isinstance(versions, list) or not all(isinstance(v, str | int) for v in versions):
        raise BackendGarbage(f"{where}: 'versions' is not a list of versions")
    return ModelMetadata(
        name=_text(obj, "name", where),
        versions=tuple(str(v) for v in versions),
        platform=str(obj.get("platform") or ""),
        inputs=_metas(obj, "inputs", where),
        outputs=_metas(obj, "outputs", where),
    )


def _metas(obj: Mapping[str, Any], key: str, where: str) -> tuple[TensorMeta, ...]:
    items = obj.get(key)
    if not isinstance(items, list):
        raise BackendGarbage(f"{where}: {key!r} is not a list")
    metas = []
    for i, item in enumerate(items):
        at = f"{where}: {key}[{i}]"
        entry = _object(item, at)
        datatype = _text(entry, "datatype", at)
        if datatype not in V2_DTYPES and datatype != BYTES:
            raise BackendGarbage(f"{at}: unknown datatype {datatype!r}")
        shape = entry.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and -1 <= d < MAX_DIM for d in shape)
        ):
            raise BackendGarbage(f"{at}: shape {shape!r} is not a list of sizes (-1: any)")
        metas.append(TensorMeta(_text(entry, "name", at), datatype, tuple(shape)))
    names = [m.name for m in metas]
    if len(set(names)) != len(names):
        raise BackendGarbage(f"{where}: {key} repeat a name: {names}")
    return tuple(metas)


def input_specs(meta: ModelMetadata, *, max_items: int, max_chars: int) -> tuple[InputSpec, ...]:
    """What the node checks before forwarding: exact dtypes, shapes with -1 as any size."""
    specs: list[InputSpec] = []
    for m in meta.inputs:
        if m.datatype == BYTES:
            specs.append(TextSpec(m.name, max_items=max_items, max_chars=max_chars))
        else:
            shape = tuple(None if d < 0 else d for d in m.shape)
            specs.append(TensorSpec(m.name, frozenset({V2_DTYPES[m.datatype]}), shape))
    return tuple(specs)


def output_specs(meta: ModelMetadata) -> tuple[OutputSpec, ...]:
    """The outputs as ``decode_response`` gives them (see ``output_spec``)."""
    return tuple(
        output_spec(m.name, TEXT if m.datatype == BYTES else V2_DTYPES[m.datatype], m.shape)
        for m in meta.outputs
    )


def output_spec(name: str, kind: str, shape: tuple[int, ...]) -> OutputSpec:
    """A server's output (a dtype or TEXT, -1 as any size) as this codec decodes it:
    a tensor of that shape, or text as one flat list of strings."""
    dims = tuple(None if d < 0 else d for d in shape)
    if kind == TEXT:
        dims = (None,) if None in dims else (math.prod(shape),)
    return OutputSpec(name, kind, dims)


# -- inference -----------------------------------------------------------------------


def encode_request(
    inputs: Mapping[str, Value], *, request_id: str | None = None, outputs: Collection[str] = ()
) -> dict[str, Any]:
    """An inference request body. Inputs must have passed the runner's check already."""
    body: dict[str, Any] = {"inputs": [encode_tensor(name, v) for name, v in inputs.items()]}
    if request_id:
        body["id"] = request_id
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def encode_tensor(name: str, value: Value) -> dict[str, Any]:
    """One request input: numbers as a flat row-major list, text as BYTES."""
    if isinstance(value, Tensor):
        if value.dtype not in DTYPE_TO_V2:
            raise ValueError(f"input {name!r}: dtype {value.dtype} has no KServe v2 datatype")
        return {
            "name": name,
            "shape": list(value.shape),
            "datatype": DTYPE_TO_V2[value.dtype],
            "data": value.numpy().ravel().tolist(),
        }
    if isinstance(value, str):
        return {"name": name, "shape": [1], "datatype": BYTES, "data": [value]}
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return {"name": name, "shape": [len(value)], "datatype": BYTES, "data": list(value)}
    raise ValueError(f"input {name!r}: a KServe v2 input is a tensor or text")


def decode_response(
    body: Any,
    where: str,
    *,
    expect: Collection[str] = (),
    request_id: str | None = None,
    binary: bytes = b"",
) -> dict[str, Value]:
    """An inference answer's outputs by name; every name in ``expect`` must be there.

    ``binary`` is what followed the JSON header of a binary answer: outputs with
    ``parameters.binary_data_size`` take their bytes from it, in order, and it
    must be used up exactly.
    """
    obj = _object(body, where)
    if request_id and "id" in obj and obj["id"] != request_id:
        raise BackendGarbage(f"{where}: answer to request {obj['id']!r}, not {request_id!r}")
    items = obj.get("outputs")
    if not isinstance(items, list):
        raise BackendGarbage(f"{where}: 'outputs' is not a list")
    outputs: dict[str, Value] = {}
    offset = 0
    for i, item in enumerate(items):
        at = f"{where}: outputs[{i}]"
        size = _binary_size(item, at)
        if size is None:
            name, value = decode_tensor(item, at)
        else:
            if offset + size > len(binary):
                raise BackendGarbage(f"{at}: {size} binary bytes, {len(binary) - offset} left")
            name, value = decode_binary_tensor(item, binary[offset : offset + size], at)
            offset += size
        if name in outputs:
            raise BackendGarbage(f"{where}: output {name!r} appears twice")
        outputs[name] = value
    if offset != len(binary):
        raise BackendGarbage(f"{where}: {len(binary) - offset} binary bytes belong to no output")
    missing = sorted(set(expect) - set(outputs))
    if missing:
        raise BackendGarbage(f"{where}: outputs {missing} missing (got {sorted(outputs)})")
    return outputs


# -- the binary tensor extension -----------------------------------------------------


def encode_binary_request(
    inputs: Mapping[str, Value], *, request_id: str | None = None, binary_outputs: bool = True
) -> tuple[bytes, int]:
    """A binary inference request: (body, length of its JSON header)."""
    header: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        item = encode_tensor(name, value)
        if isinstance(value, Tensor):
            blob = bytes(value.data)
        else:
            blob = b"".join(_bytes_item(s) for s in item["data"])
        del item["data"]
        item["parameters"] = {"binary_data_size": len(blob)}
        header.append(item)
        blobs.append(blob)
    body: dict[str, Any] = {"inputs": header}
    if request_id:
        body["id"] = request_id
    if binary_outputs:
        body["parameters"] = {"binary_data_output": True}
    head = json.dumps(body, separators=(",", ":")).encode()
    return head + b"".join(blobs), len(head)


def decode_binary_response(
    data: bytes, where: str, *, expect: Collection[str] = (), request_id: str | None = None
) -> dict[str, Value]:
    """A binary (or plain JSON) answer: the JSON header, then the outputs' bytes."""
    try:
        # latin-1 maps each byte to one character, so the end index is a byte offset.
        _, end = json.JSONDecoder().raw_decode(data.decode("latin-1"))
        header = bounded_json.loads(data[:end])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BackendGarbage(f"{where}: the answer does not start with a JSON header") from exc
    return decode_response(
        header, where, expect=expect, request_id=request_id, binary=bytes(data[end:])
    )


def decode_binary_tensor(item: Any, blob: bytes, where: str) -> tuple[str, Value]:
    """One answer tensor whose data came as raw bytes."""
    _, name, at, datatype, shape = _header(item, where)
    count = math.prod(shape)
    if datatype == BYTES:
        items = _split_bytes(blob, at)
        if len(items) != count:
            raise BackendGarbage(f"{at}: {len(items)} strings for shape {list(shape)}")
        return name, items
    if datatype not in V2_DTYPES:
        raise BackendGarbage(f"{at}: unknown datatype {datatype!r}")
    dtype = np.dtype(V2_DTYPES[datatype]).newbyteorder("<")
    if len(blob) != count * dtype.itemsize:
        raise BackendGarbage(f"{at}: {len(blob)} bytes for {datatype} of shape {list(shape)}")
    if datatype == "BOOL" and blob.strip(b"\x00\x01"):
        raise BackendGarbage(f"{at}: BOOL bytes other than 0 and 1")
    return name, Tensor(dtype.name, shape, blob)


def _binary_size(item: Any, where: str) -> int | None:
    params = item.get("parameters") if isinstance(item, Mapping) else None
    if not isinstance(params, Mapping) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BackendGarbage(f"{where}: binary_data_size {size!r} is not a size")
    return size


def _bytes_item(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def _split_bytes(blob: bytes, at: str) -> list[str]:
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise BackendGarbage(f"{at}: a BYTES item's length is cut short")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise BackendGarbage(f"{at}: a BYTES item runs past the data")
        try:
            items.append(blob[offset : offset + size].decode())
        except UnicodeDecodeError as exc:
            raise BackendGarbage(f"{at}: a BYTES item is not UTF-8") from exc
        offset += size
    return items


def _shape(shape: Any, at: str) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < MAX_DIM for d in shape)
    ):
        raise BackendGarbage(f"{at}: shape {shape!r} is not a list of sizes")
    return tuple(shape)


def _header(item: Any, where: str) -> tuple[Mapping[str, Any], str, str, str, tuple[int, ...]]:
    """A tensor's object, name, where to say it is, datatype and shape, checked."""
    entry = _object(item, where)
    name = _text(entry, "name", where)
    at = f"{where} ({name})"
    return entry, name, at, _text(entry, "datatype", at), _shape(entry.get("shape"), at)


def decode_tensor(item: Any, where: str) -> tuple[str, Value]:
    """One answer tensor, checked: datatype known, data count and kinds match the shape."""
    entry, name, at, datatype, sizes = _header(item, where)
    shape = list(sizes)
    data = entry.get("data")
    if not isinstance(data, list):
        raise BackendGarbage(f"{at}: no 'data' list (binary outputs were not asked for)")
    count = math.prod(shape)
    if datatype == BYTES:
        flat = _flatten_text(data, at)
        if len(flat) != count:
            raise BackendGarbage(f"{at}: {len(flat)} strings for shape {shape}")
        return name, flat
    if datatype not in V2_DTYPES:
        raise BackendGarbage(f"{at}: unknown datatype {datatype!r}")
    return name, Tensor.from_numpy(_numbers(data, V2_DTYPES[datatype], tuple(shape), at))


def _numbers(data: list[Any], dtype: str, shape: tuple[int, ...], at: str) -> np.ndarray[Any, Any]:
    array = json_array(data, dtype, at)
    if array.size != math.prod(shape):
        raise BackendGarbage(f"{at}: {array.size} values for shape {list(shape)}")
    if array.ndim != 1 and array.shape != shape:
        raise BackendGarbage(f"{at}: nested data of shape {list(array.shape)}, not {list(shape)}")
    return array.reshape(shape)


def json_array(data: Any, dtype: str, at: str) -> np.ndarray[Any, Any]:
    """JSON numbers (a regular nested list) as an array of ``dtype``, values checked.

    Numbers must be of the dtype's kind (integers for integer dtypes, true/false
    for bool, any number for floats) and in its range.
    """
    target = np.dtype(dtype)
    try:
        raw = np.array(data)
    except (ValueError, OverflowError) as exc:
        raise BackendGarbage(f"{at}: data is not a regular array of numbers") from exc
    if raw.ndim > MAX_NDIM:
        raise BackendGarbage(f"{at}: data nested deeper than {MAX_NDIM}")
    # Python ints past int64 make numpy fall back to floats or objects: read those exactly.
    if raw.size and target.kind in "iu" and raw.dtype.kind in "fO" and _all_ints(data):
        try:
            return np.array(data, dtype=target)
        except OverflowError as exc:
            raise BackendGarbage(f"{at}: values out of range for {dtype}") from exc
    if raw.size and raw.dtype.kind not in _KINDS[target.kind]:
        raise BackendGarbage(f"{at}: {raw.dtype.kind!r}-kind values for datatype {dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        array = raw.astype(target)
    if target.kind in "iu" and raw.size and not np.array_equal(array, raw):
        raise BackendGarbage(f"{at}: values out of range for {dtype}")
    return array


def _all_ints(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif type(item) is not int:
            return False
    return True


def _flatten_text(data: list[Any], at: str) -> list[str]:
    flat: list[str] = []
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise BackendGarbage(f"{at}: BYTES data holds a {type(item).__name__}")
    return flat


def _object(body: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise BackendGarbage(f"{where}: expected a JSON object, got {type(body).__name__}")
    return body


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise BackendGarbage(f"{where}: {key!r} is not a non-empty string")
    return value
