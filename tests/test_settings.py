"""Config tables: every bad field is refused with a message naming it."""

from __future__ import annotations

import pytest

from protocols.config import Table
from protocols.errors import ConfigError


def test_reads_typed_fields_and_defaults() -> None:
    t = Table({"name": "m", "batch": 8, "wait": 2, "on": True, "keys": "k1"}, "models[0]")
    assert t.text("name") == "m"
    assert t.integer("batch", low=1, high=64) == 8
    assert t.number("wait") == 2.0
    assert t.flag("on") is True
    assert t.texts("keys") == ("k1",)
    assert t.text("device", "CPU") == "CPU"
    t.done()


@pytest.mark.parametrize(
    ("data", "read", "message"),
    [
        ({}, lambda t: t.text("name"), "models[1].name: required"),
        ({"name": 3}, lambda t: t.text("name"), "models[1].name: expected a non-empty string"),
        ({"d": "X"}, lambda t: t.text("d", choices=("CPU",)), "expected one of ['CPU']"),
        ({"b": True}, lambda t: t.integer("b"), "models[1].b: expected an integer"),
        ({"b": 99}, lambda t: t.integer("b", high=64), "from 0 to 64, got 99"),
        ({"w": "1"}, lambda t: t.number("w"), "models[1].w: expected a number"),
        ({"o": 1}, lambda t: t.flag("o"), "expected true or false"),
        ({"k": [1]}, lambda t: t.texts("k"), "expected a list of non-empty strings"),
    ],
)
def test_bad_fields_name_the_field(data: dict[str, object], read: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read(Table(data, "models[1]"))  # type: ignore[operator]


def test_unknown_fields_are_refused() -> None:
    t = Table({"name": "m", "devcie": "CPU"}, "models[0]")
    t.text("name")
    with pytest.raises(ConfigError, match=r"models\[0\]: unknown field\(s\) devcie"):
        t.done()


def test_not_a_table() -> None:
    with pytest.raises(ConfigError, match="expected a table"):
        Table([1, 2], "backends[0]")  # type: ignore[arg-type]
