"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from protocols import Tensor, Value
from runners.base import TEXT, ModelInfo


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``predicate()`` holds; fail the test after ``timeout_s``."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (polling node state from outside is the point)
            await trio.sleep(0.01)


def undeclared(info: ModelInfo, outputs: Mapping[str, Value]) -> list[str]:
    """How ``outputs`` (an answer of the model ``info`` describes) differ from the
    outputs it declares: names it does not declare, other dtypes or shapes."""
    specs = {s.name: s for s in info.outputs}
    wrong = []
    for name, value in outputs.items():
        spec = specs.get(name)
        if spec is None:
            wrong.append(f"{name}: not declared")
            continue
        dtype, shape = _as_declared(value)
        fits = len(shape) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, shape, strict=True)
        )
        if dtype != spec.dtype or not fits:
            wrong.append(f"{name}: {dtype} {list(shape)}, declared {spec.dtype} {spec.shape}")
    return wrong


def _as_declared(value: Value) -> tuple[str, tuple[int, ...]]:
    """The dtype and shape an output is declared with (runners.base.OutputSpec)."""
    if isinstance(value, Tensor):
        return value.dtype, value.shape
    if isinstance(value, str):
        return TEXT, (1,)
    if isinstance(value, list):
        return TEXT, (len(value),)
    if isinstance(value, bool):
        return "bool", (1,)
    return ("int64" if isinstance(value, int) else "float64"), (1,)
