"""The TensorFlow-Serving REST protocol (OVMS's ``/v1`` API) as pure functions: no I/O.

Routes (OVMS documents them in "TensorFlow Serving compatible RESTful API"):

- ``POST /v1/models/{m}[/versions/{v}]:predict`` with ``instances`` (row format:
  one entry per batch item, each a value or an object of named inputs) or
  ``inputs`` (columnar: a value or an object of named tensors); the answer is
  ``predictions`` or ``outputs`` in the same shape;
- ``GET /v1/models/{m}[/versions/{v}]``: ``model_version_status`` (version, state,
  status.error_code/error_message) of each version;
- ``GET /v1/models/{m}[/versions/{v}]/metadata``: a GetModelMetadataResponse as
  JSON (camelCase from OVMS, snake_case from TF-Serving: both are read);
- ``POST /v1/config/reload`` and ``GET /v1/config``: model status of every
  served model, by name.

JSON carries no dtype: answers become tensors of the dtypes the metadata
declared for the outputs, or float32/int64/bool by the values' kind when the
metadata was not read. Everything is checked (a ragged list, strings where
numbers belong, a missing output): ``BackendGarbage`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from protocols import Tensor, Value, bounded_json
from protocols.tensors import MAX_NDIM

from ..base import InputSpec, OutputSpec, TensorSpec, TextSpec
from .errors import BackendGarbage
from .kserve_v2 import json_array, output_spec

TF_DTYPES: Mapping[str, str] = {
    "DT_FLOAT": "float32",
    "DT_HALF": "float16",
    "DT_DOUBLE": "float64",
    "DT_INT8": "int8",
    "DT_INT16": "int16",
    "DT_INT32": "int32",
    "DT_INT64": "int64",
    "DT_UINT8": "uint8",
    "DT_UINT16": "uint16",
    "DT_UINT32": "uint32",
    "DT_UINT64": "uint64",
    "DT_BOOL": "bool",
}
DT_STRING = "DT_STRING"
DEFAULT_SIGNATURE = "serving_default"
CONFIG_STATUS = "/v1/config"
CONFIG_RELOAD = "/v1/config/reload"
_DEFAULT_BY_KIND = {"f": "float32", "i": "int64", "u": "int64", "b": "bool"}


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One served version as ``model_version_status`` reports it."""

    version: str
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END
    error_code: str
    error_message: str

    def describe(self) -> dict[str, str]:
        return {
            "version": self.version,
            "state": self.state,
            "error_code": self.error_code,
            "error_message": self.error_message,
        }


@dataclass(frozen=True, slots=True)
class Signature:
    """A signature's inputs and outputs: name -> (dtype or "text", shape with -1 as any)."""

    inputs: Mapping[str, tuple[str, tuple[int, ...]]]
    outputs: Mapping[str, tuple[str, tuple[int, ...]]]


# -- paths ---------------------------------------------------------------------------


def model_path(model: str, version: str | None = None) -> str:
    path = f"/v1/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return path


def predict_path(model: str, version: str | None = None) -> str:
    return model_path(model, version) + ":predict"


def metadata_path(model: str, version: str | None = None) -> str:
    return model_path(model, version) + "/metadata"


# -- status and metadata -------------------------------------------------------------


def parse_model_status(body: Any, where: str) -> tuple[VersionStatus, ...]:
    obj = _object(body, where)
    items = obj.get("model_version_status")
    if not isinstance(items, list):
        raise BackendGarbage(f"{where}: 'model_version_status' is not a list")
    statuses = []
    for i, item in enumerate(items):
        at = f"{where}: model_version_status[{i}]"
        entry = _object(item, at)
        version, state = entry.get("version"), entry.get("state")
        status = entry.get("status") or {}
        if (
            not isinstance(version, str | int)
            or isinstance(version, bool)
            or not isinstance(state, str)
            or not isinstance(status, Mapping)
        ):
            raise BackendGarbage(f"{at}: needs a version, a state and a status object")
        statuses.append(
            VersionStatus(
                str(version),
                state,
                str(status.get("error_code", "OK")),
                str(status.get("error_message", "")),
            )
        )
    return tuple(statuses)


def parse_config_status(body: Any, where: str) -> dict[str, tuple[VersionStatus, ...]]:
    """``GET /v1/config`` or ``POST /v1/config/reload``: every model's version statuses."""
    obj = _object(body, where)
    return {str(name): parse_model_status(entry, f"{where}: {name}") for name, entry in obj.items()}


def parse_metadata(body: Any, where: str, signature: str = DEFAULT_SIGNATURE) -> Signature:
    obj = _object(body, where)
    meta = _object(obj.get("metadata"), f"{where}: metadata")
    defs = _object(meta.get("signature_def"), f"{where}: signature_def")
    inner = defs.get("signatureDef", defs.get("signature_def"))
    sigs = _object(inner, f"{where}: signatureDef")
    if signature not in sigs:
        raise BackendGarbage(f"{where}: no signature {signature!r} (has {sorted(sigs)})")
    sig = _object(sigs[signature], f"{where}: {signature}")
    return Signature(
        inputs=_tensor_infos(sig.get("inputs"), f"{where}: {signature}.inputs"),
        outputs=_tensor_infos(sig.get("outputs"), f"{where}: {signature}.outputs"),
    )


def _tensor_infos(body: Any, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    infos = {}
    for key, item in _object(body, where).items():
        at = f"{where}.{key}"
        entry = _object(item, at)
        dtype = entry.get("dtype")
        if dtype == DT_STRING:
            kind = "text"
        elif isinstance(dtype, str) and dtype in TF_DTYPES:
            kind = TF_DTYPES[dtype]
        else:
            raise BackendGarbage(f"{at}: unknown dtype {dtype!r}")
        shape_obj = _object(entry.get("tensorShape", entry.get("tensor_shape")), at)
        dims = shape_obj.get("dim", [])
        if not isinstance(dims, list) or len(dims) > MAX_NDIM:
            raise BackendGarbage(f"{at}: tensorShape.dim is not a list")
        shape = []
        for dim in dims:
            try:
                size = int(_object(dim, at).get("size", -1))
            except (TypeError, ValueError) as exc:
                raise BackendGarbage(f"{at}: a dim size is not an integer") from exc
            if not -1 <= size < 2**31:
                raise BackendGarbage(f"{at}: dim size {size} out of range")
            shape.append(size)
        infos[str(key)] = (kind, tuple(shape))
    return infos


def input_specs(sig: Signature, *, max_items: int, max_chars: int) -> tuple[InputSpec, ...]:
    specs: list[InputSpec] = []
    for name, (kind, shape) in sig.inputs.items():
        if kind == "text":
            specs.append(TextSpec(name, max_items=max_items, max_chars=max_chars))
        else:
            dims = tuple(None if d < 0 else d for d in shape)
            specs.append(TensorSpec(name, frozenset({kind}), dims))
    return tuple(specs)


def output_specs(sig: Signature) -> tuple[OutputSpec, ...]:
    """The outputs as ``decode_predict`` gives them: tensors, or text as a flat list."""
    return tuple(output_spec(name, kind, shape) for name, (kind, shape) in sig.outputs.items())


# -- predict -------------------------------------------------------------------------


def encode_columnar(inputs: Mapping[str, Value], signature: str | None = None) -> dict[str, Any]:
    """``{"inputs": {name: nested list}}``: each input whole, by name."""
    body: dict[str, Any] = {"inputs": {name: _jsonable(name, v) for name, v in inputs.items()}}
    if signature:
        body["signature_name"] = signature
    return body


def encode_rows(inputs: Mapping[str, Value], signature: str | None = None) -> dict[str, Any]:
    """``{"instances": [{name: row}, ...]}``: every input split along its first dimension."""
    columns = {name: _jsonable(name, v) for name, v in inputs.items()}
    sizes = {name: len(col) if isinstance(col, list) else -1 for name, col in columns.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise ValueError(f"row format needs inputs with one batch size, got {sizes}")
    n = next(iter(sizes.values()))
    body: dict[str, Any] = {
        "instances": [{name: col[i] for name, col in columns.items()} for i in range(n)]
    }
    if signature:
        body["signature_name"] = signature
    return body


def encode_preformatted(text: str, signature: str | None = None) -> dict[str, Any]:
    """A caller's own JSON ``instances`` list, forwarded as it is once it parses."""
    try:
        instances = bounded_json.loads(text)
    except bounded_json.BadJSON as exc:
        raise ValueError(f"'instances' is {exc}") from None
    if not isinstance(instances, list) or not instances:
        raise ValueError("'instances' must be a non-empty JSON list")
    body: dict[str, Any] = {"instances": instances}
    if signature:
        body["signature_name"] = signature
    return body


def _jsonable(name: str, value: Value) -> Any:
    if isinstance(value, Tensor):
        return value.numpy().tolist()
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(s, str) for s in value)
    ):
        return value
    raise ValueError(f"input {name!r}: a TF-Serving input is a tensor or text")


def decode_predict(
    body: Any,
    where: str,
    *,
    outputs: Mapping[str, str] | None = None,
) -> dict[str, Value]:
    """A ``:predict`` answer's outputs by name.

    ``outputs`` maps each output the metadata declared to its dtype (or "text");
    with one declared output an unnamed answer takes its name, and every declared
    output must be present. Without metadata an unnamed answer is ``output``.
    """
    obj = _object(body, where)
    declared = dict(outputs or {})
    lone = next(iter(declared)) if len(declared) == 1 else "output"
    if "predictions" in obj:
        rows = obj["predictions"]
        if not isinstance(rows, list):
            raise BackendGarbage(f"{where}: 'predictions' is not a list")
        if rows and all(isinstance(r, Mapping) for r in rows):
            names = set(rows[0])
            if any(set(r) != names for r in rows):
                raise BackendGarbage(f"{where}: predictions name different outputs")
            columns: dict[str, Any] = {n: [r[n] for r in rows] for n in names}
        else:
            columns = {lone: rows}
    elif "outputs" in obj:
        out = obj["outputs"]
        columns = dict(out) if isinstance(out, Mapping) else {lone: out}
    else:
        raise BackendGarbage(f"{where}: neither 'predictions' nor 'outputs' in the answer")
    missing = sorted(set(declared) - set(columns))
    if missing:
        raise BackendGarbage(f"{where}: outputs {missing} missing (got {sorted(columns)})")
    return {
        str(name): _value(col, declared.get(name), f"{where}: {name}")
        for name, col in columns.items()
    }


def _value(data: Any, kind: str | None, at: str) -> Value:
    if kind == "text" or (kind is None and _all_text(data)):
        if isinstance(data, str):
            return data
        if not _all_text(data):
            raise BackendGarbage(f"{at}: expected strings")
        return list(_flat(data))
    try:
        raw = np.array(data)
    except (ValueError, OverflowError) as exc:
        raise BackendGarbage(f"{at}: not a regular array of numbers") from exc
    if raw.dtype.kind not in "biufO":
        raise BackendGarbage(f"{at}: not an array of numbers ({raw.dtype.kind!r}-kind values)")
    if kind is None and raw.dtype.kind == "O":
        raise BackendGarbage(f"{at}: not an array of numbers")
    array = json_array(data, kind or _DEFAULT_BY_KIND[raw.dtype.kind], at)
    return Tensor.from_numpy(array)


def _all_text(data: Any) -> bool:
    if isinstance(data, str):
        return True
    return isinstance(data, list) and bool(data) and all(isinstance(s, str) for s in _flat(data))


def _flat(data: Any) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _object(body: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise BackendGarbage(f"{where}: expected a JSON object, got {type(body).__name__}")
    return body
