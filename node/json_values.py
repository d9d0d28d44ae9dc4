"""Swarm values to and from JSON: what the WebSocket, the MCP tools and the CLI
accept and print.

One form for every JSON client of swarm's own (the KServe and OpenAI routes
speak their protocols' forms instead). ``jsonable`` writes it (``swarm submit
--json``, ``swarm status --json``, WebSocket results); the readers below take it:

- ``inputs``: a text or a list of texts, given to the model's first text input
  (``text`` for embeddings, ``prompt`` for generation); or an object of named
  inputs whose values are texts, lists of texts, numbers, or tensors
  ``{"dtype": "float32", "shape": [2, 3], "data": [[...], [...]]}`` (data nested
  or flat in C order; shape optional when data is nested);
- ``params``: an object of strings, numbers, booleans, nulls or lists of strings.

A value that does not fit is a ``BadValue`` naming where it is (``inputs.x``),
which each front end turns into its own typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protocols import DTYPES, Param, Tensor, Value

MAX_ITEMS = 4096  # texts in one list
MAX_NAMED = 64  # named inputs, or params
MAX_ELEMENTS = 1 << 24  # values in one tensor


class BadValue(ValueError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def inputs_from_json(raw: Any, described: Mapping[str, Any]) -> dict[str, Value]:
    """``raw`` inputs for the model ``described`` (its capability description)."""
    if isinstance(raw, str | list):
        names = [
            spec.get("name")
            for spec in described.get("inputs") or ()
            if isinstance(spec, Mapping) and spec.get("kind") == "text"
        ]
        if not names:
            example = '{"NAME": {"dtype": "float32", "shape": [...], "data": [...]}}'
            raise BadValue("inputs", f"{described['name']} takes no text; give e.g. {example}")
        return {str(names[0]): _texts("inputs", raw)}
    if not isinstance(raw, Mapping) or not raw:
        raise BadValue("inputs", "a text, a list of texts, or an object of named inputs")
    if len(raw) > MAX_NAMED:
        raise BadValue("inputs", f"at most {MAX_NAMED} named inputs")
    inputs: dict[str, Value] = {}
    for name, value in raw.items():
        where = f"inputs.{name}"
        if isinstance(value, bool | int | float):
            inputs[name] = value
        elif isinstance(value, str | list):
            inputs[name] = _texts(where, value)
        elif isinstance(value, Mapping):
            inputs[name] = tensor_from_json(where, value)
        else:
            raise BadValue(where, "a text, a list of texts, a number or a tensor object")
    return inputs


def params_from_json(raw: Any) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_NAMED:
        raise BadValue("params", f"an object of at most {MAX_NAMED} parameters")
    for key, value in raw.items():
        scalar = value is None or isinstance(value, str | int | float | bool)
        texts = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not (scalar or texts):
            raise BadValue(f"params.{key}", "a string, number, boolean, null or list of strings")
    return dict(raw)


def tensor_from_json(where: str, value: Mapping[str, Any]) -> Tensor:
    extra = sorted(set(value) - {"dtype", "shape", "data"})
    if extra:
        raise BadValue(where, f"a tensor has dtype, shape and data, not {', '.join(extra)}")
    dtype = value.get("dtype")
    if dtype not in DTYPES:
        raise BadValue(where, f"dtype must be one of {', '.join(sorted(DTYPES))}")
    shape = value.get("shape")
    if shape is not None and not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadValue(where, "shape must be a list of non-negative integers")
    try:
        array = np.asarray(value.get("data"), dtype=np.dtype(str(dtype)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadValue(where, f"data is not an array of {dtype}: {exc}") from exc
    if array.size > MAX_ELEMENTS:
        raise BadValue(where, f"more than {MAX_ELEMENTS} elements")
    if shape is not None:
        if int(np.prod(shape, dtype=np.int64)) != array.size:
            raise BadValue(where, f"{array.size} values do not fill shape {shape}")
        array = array.reshape(shape)
    return Tensor.from_numpy(np.ascontiguousarray(array))


def _texts(where: str, value: str | list[Any]) -> str | list[str]:
    if isinstance(value, str):
        return value
    if not value or len(value) > MAX_ITEMS or not all(isinstance(v, str) for v in value):
        raise BadValue(where, f"a list of 1 to {MAX_ITEMS} strings")
    return list(value)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: tensors as {dtype, shape, data}, bytes as hex."""
    if isinstance(value, Tensor):
        return {"dtype": value.dtype, "shape": list(value.shape), "data": value.numpy().tolist()}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value
