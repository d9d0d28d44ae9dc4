"""node.gateway.bounded_json on its own: any text gives a JSON value or BadJSON."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.bounded_json import MAX_DEPTH, BadJSON, loads, nests_within


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_limit_parses_and_one_more_is_refused() -> None:
    assert loads(nested(MAX_DEPTH)) == json.loads(nested(MAX_DEPTH))
    objects = '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH
    assert loads(objects.encode()) == json.loads(objects)
    for deep in (nested(MAX_DEPTH + 1), '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)):
        with pytest.raises(BadJSON, match=f"nested deeper than {MAX_DEPTH} levels"):
            loads(deep)


@pytest.mark.parametrize(
    "text",
    [
        nested(100_000),  # past the interpreter's recursion limit: RecursionError in json
        "[" * 100_000,  # deep and unbalanced
        nested(900),  # parses in json, under the recursion limit
        b"[" * 50_000 + b"]" * 50_000,
    ],
)
def test_deep_text_is_bad_json_not_a_recursion_error(text: str | bytes) -> None:
    with pytest.raises(BadJSON, match="nested deeper"):
        loads(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "Expecting value"), ("{", "Expecting property name"), (b"\xff[]", "utf-8")],
)
def test_text_that_is_not_json_says_why(text: str | bytes, reason: str) -> None:
    with pytest.raises(BadJSON, match=reason) as caught:
        loads(text)
    assert str(caught.value).startswith("not JSON: ")


def test_brackets_in_strings_do_not_nest() -> None:
    value = {"text": "[" * 10_000, "more": ["{" * 500, '\\"[[['], "é": "ü]]]"}
    text = json.dumps(value, ensure_ascii=False)
    assert loads(text) == value and loads(text.encode()) == value


def test_nests_within_counts_arrays_and_objects() -> None:
    assert nests_within(1, 0) and nests_within("[[", 0)
    assert not nests_within([], 0) and nests_within([], 1)
    assert nests_within({"a": [1, {"b": []}]}, 4) and not nests_within({"a": [1, {"b": []}]}, 3)
    assert not nests_within([1, 2, [3, [4]]], 2) and nests_within([1, 2, [3, [4]]], 3)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(json_values)
def test_shallow_json_reads_as_json_does(value: object) -> None:
    text = json.dumps(value)
    assert loads(text) == json.loads(text)


@given(st.binary(max_size=200) | st.text(alphabet='[]{}":,1 ', max_size=300))
def test_any_text_gives_a_value_or_bad_json(text: bytes | str) -> None:
    with contextlib.suppress(BadJSON):  # anything else fails the test
        loads(text)
