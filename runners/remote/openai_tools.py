"""Function calling over the OpenAI-compatible API, as pure functions.

A swarm request carries what it needs as text, since params and inputs are
scalars and strings on the wire: the ``tools`` param is the JSON array of tool
definitions, ``tool_choice`` is ``auto``, ``none``, ``required`` or the JSON of
a named choice, and the ``messages`` input may hold assistant turns with
``tool_calls`` and ``tool`` turns answering them (``tool_call_id``). An answer
that calls tools gives the ``tool_calls`` output: the JSON array of complete
calls ``{"id", "type": "function", "function": {"name", "arguments"}}``. A
stream's tool-call fragments are put together here and given whole once the
stream ends, so every consumer sees complete calls.

What a caller sends is checked (``BadInput``); what a backend answers is
checked too (``BackendGarbage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocols import bounded_json

from ..errors import BadInput
from .errors import BackendGarbage

MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
CHOICES = ("auto", "none", "required")


def parse_tools(model: str, text: Any) -> list[dict[str, Any]]:
    """The ``tools`` param: a JSON array of ``{"type": "function", "function": {...}}``."""
    data = _json(model, "param 'tools'", text)
    if not isinstance(data, list) or not 1 <= len(data) <= MAX_TOOLS:
        raise BadInput(f"{model}: param 'tools' must be a JSON array of 1 to {MAX_TOOLS} tools")
    for i, tool in enumerate(data):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            message = f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}"
            raise BadInput(f"{model}: {message}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadInput(f"{model}: tools[{i}].function.parameters must be a JSON schema")
    return data


def parse_tool_choice(model: str, text: Any) -> str | dict[str, Any]:
    """``tool_choice``: auto, none, required, or the JSON of a named function."""
    if text in CHOICES:
        return str(text)
    data = _json(model, "param 'tool_choice'", text)
    function = data.get("function") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        message = f"param 'tool_choice' must be one of {list(CHOICES)} or a named function"
        raise BadInput(f"{model}: {message}")
    return data


def check_tool_fields(where: str, message: Mapping[str, Any]) -> None:
    """A message's tool fields: an assistant's ``tool_calls``, a tool's ``tool_call_id``."""
    calls = message.get("tool_calls")
    if calls is not None:
        if message.get("role") != "assistant":
            raise BadInput(f"{where}.tool_calls belong to an assistant message")
        try:
            parse_tool_calls(where, calls)
        except BackendGarbage as exc:
            raise BadInput(str(exc)) from None
    call_id = message.get("tool_call_id")
    if message.get("role") == "tool" and (not isinstance(call_id, str) or not call_id):
        raise BadInput(f"{where}: a tool message needs the 'tool_call_id' it answers")
    if call_id is not None and message.get("role") != "tool":
        raise BadInput(f"{where}.tool_call_id belongs to a tool message")


def parse_tool_calls(where: str, raw: Any) -> list[dict[str, Any]]:
    """Complete tool calls, as an answer or an assistant message carries them."""
    if not isinstance(raw, list) or len(raw) > MAX_TOOL_CALLS:
        raise BackendGarbage(f"{where}: tool_calls must be a list of at most {MAX_TOOL_CALLS}")
    calls = []
    for i, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise BackendGarbage(f"{where}: tool_calls[{i}] is not a complete function call")
        name, arguments = function["name"], function["arguments"]
        calls.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


def tool_deltas(body: Any) -> Any:
    """The tool-call fragments of a stream chunk's first choice, if any."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    return delta.get("tool_calls") if isinstance(delta, dict) else None


class ToolCallParts:
    """A stream's tool-call fragments, put together by their ``index``."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def feed(self, where: str, deltas: Any) -> None:
        if deltas is None:
            return
        if not isinstance(deltas, list):
            raise BackendGarbage(f"{where}: delta.tool_calls is not a list")
        for delta in deltas:
            index = delta.get("index") if isinstance(delta, dict) else None
            if type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
                raise BackendGarbage(f"{where}: a tool call fragment has no valid index")
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            function = delta.get("function") or {}
            if not isinstance(function, dict):
                raise BackendGarbage(f"{where}: a tool call fragment's function is not an object")
            for key, value in (("id", delta.get("id")), *function.items()):
                if key in call and value is not None:
                    if not isinstance(value, str):
                        raise BackendGarbage(f"{where}: tool call field {key!r} is not text")
                    # ids and names come whole in one fragment; arguments come in pieces
                    call[key] = call[key] + value if key == "arguments" else value

    def calls(self, where: str) -> list[dict[str, Any]]:
        if any(not c["id"] or not c["name"] for c in self._calls.values()):
            raise BackendGarbage(f"{where}: the stream's tool calls lack an id or a name")
        return [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for _, c in sorted(self._calls.items())
        ]


def _json(model: str, what: str, text: Any) -> Any:
    if not isinstance(text, str):
        raise BadInput(f"{model}: {what} must be JSON text")
    try:
        return bounded_json.loads(text)
    except bounded_json.BadJSON as exc:
        raise BadInput(f"{model}: {what} is {exc}") from None
