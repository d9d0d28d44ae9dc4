"""runners.base.check_inputs: every way an input can miss its spec is a BadInput naming it."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import ConfigError, ErrorCode, Tensor, Value
from runners.base import ModelInfo, TensorSpec, TextSpec, check_inputs
from runners.errors import BadInput

INFO = ModelInfo(
    name="m",
    task="test",
    runner="test",
    device="CPU",
    precision="fp32",
    max_batch=4,
    inputs=(
        TensorSpec("image", frozenset({"float32", "float16"}), (None, 3, 8)),
        TextSpec("prompt", max_items=2, max_chars=5),
        TensorSpec("mask", frozenset({"bool"}), (None,), required=False),
    ),
)


def image(shape: tuple[int, ...] = (2, 3, 8), dtype: str = "float32") -> Tensor:
    return Tensor.from_numpy(np.zeros(shape, dtype=dtype))


def ok(**extra: Value) -> dict[str, Value]:
    return {"image": image(), "prompt": "hello", **extra}


@pytest.mark.parametrize(
    "inputs",
    [
        ok(),
        ok(prompt=["ab", "cde"]),
        ok(image=image((1, 3, 8), "float16")),
        ok(image=image((4, 3, 8))),
        ok(mask=Tensor.from_numpy(np.array([True, False]))),
        ok(prompt=""),
    ],
)
def test_inputs_within_spec_pass(inputs: dict[str, Value]) -> None:
    check_inputs(INFO, inputs)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt": "hi"}, "missing input 'image'"),
        ({"image": image()}, "missing input 'prompt'"),
        (ok(extra="x"), r"unknown inputs \['extra'\]"),
        (ok(image="a string"), "'image' must be a tensor"),
        (
            ok(image=image(dtype="float64")),
            "'image' has dtype float64, expected float16 or float32",
        ),
        (ok(image=image((2, 3))), r"'image' has shape \[2, 3\], expected \['\?', 3, 8\]"),
        (ok(image=image((2, 4, 8))), r"'image' has shape \[2, 4, 8\]"),
        (ok(image=image((2, 3, 8, 1))), "'image' has shape"),
        (ok(prompt=7), "'prompt' must be a string or a list of strings"),
        (ok(prompt=image()), "'prompt' must be a string or a list of strings"),
        (ok(prompt=["a", 3]), "'prompt' must be a string or a list of strings"),  # type: ignore[list-item]
        (ok(prompt=[]), "'prompt' takes 1 to 2 strings"),
        (ok(prompt=["a", "b", "c"]), "'prompt' takes 1 to 2 strings"),
        (ok(prompt="toolong"), "'prompt' has a text of 7 characters, at most 5"),
        (ok(prompt=["ok", "toolong"]), "text of 7 characters"),
        (ok(mask=image()), "'mask' has dtype float32, expected bool"),
    ],
)
def test_inputs_off_spec_are_bad_input(inputs: dict[str, Value], message: str) -> None:
    with pytest.raises(BadInput, match=message) as raised:
        check_inputs(INFO, inputs)
    assert raised.value.code is ErrorCode.BAD_REQUEST
    assert str(raised.value).startswith("m: ")  # names the model


def test_a_spec_with_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown dtypes"):
        TensorSpec("x", frozenset({"float8"}), (None,))


def test_describe_shows_any_size_as_minus_one() -> None:
    described = INFO.describe()["inputs"]
    assert described[0] == {
        "name": "image",
        "kind": "tensor",
        "dtypes": ["float16", "float32"],
        "shape": [-1, 3, 8],
        "required": True,
    }
    assert described[1]["kind"] == "text" and described[1]["max_chars"] == 5
    assert described[2]["required"] is False
