"""The OpenAI-compatible HTTP API as pure functions: request bodies in, parsed answers out.

No I/O here, so every rule is testable alone. What a swarm request may say:

- sampling params (``SAMPLING``), checked for type and range before anything
  is sent; a bad one is a ``BadInput`` naming it. They pass through to the
  backend under their OpenAI names (``repetition_penalty`` is llama.cpp's
  ``repeat_penalty`` there);
- ``messages``: a JSON array of ``{"role": ..., "content": "..."}`` objects;
- function calling: ``tools`` / ``tool_choice`` params, tool turns in the
  messages and the ``tool_calls`` output (openai_tools.py);
- answers: ``choices[0]`` of a completion or chat completion (``text`` or
  ``message.content``, ``finish_reason``) and ``usage``; stream chunks come as
  Server-Sent Events whose ``data:`` is a chunk or ``[DONE]``.

A body that lacks what the API promises is a ``BackendGarbage``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocols import Param, bounded_json

from ..errors import BadInput
from .errors import BackendFailed, BackendGarbage
from .openai_tools import check_tool_fields, parse_tool_calls, parse_tool_choice, parse_tools

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True, slots=True)
class Number:
    """A numeric param: ``integer`` or float, inclusive range."""

    low: float
    high: float
    integer: bool = False


# name -> accepted values; every one is optional and passed to the backend as is.
SAMPLING: dict[str, Number] = {
    "max_tokens": Number(1, 2**31 - 1, integer=True),
    "temperature": Number(0.0, 2.0),
    "top_p": Number(0.0, 1.0),
    "top_k": Number(-1, 2**31 - 1, integer=True),
    "min_p": Number(0.0, 1.0),
    "seed": Number(*SEED_RANGE, integer=True),
    "presence_penalty": Number(-2.0, 2.0),
    "frequency_penalty": Number(-2.0, 2.0),
    "repetition_penalty": Number(0.0, 10.0),
}
OTHER_PARAMS = ("stop", "adapter", "tools", "tool_choice")
PARAMS = tuple(SAMPLING) + OTHER_PARAMS


@dataclass(frozen=True, slots=True)
class Sampling:
    """Validated params: the body fields to send, and the adapter to address (or None)."""

    fields: Mapping[str, Any]
    adapter: str | None
    max_tokens: int


def parse_params(
    model: str, params: Mapping[str, Param], *, default_max_tokens: int, flavor: str
) -> Sampling:
    """Check ``params``; raise BadInput naming the first bad one."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise BadInput(f"{model}: unknown params {unknown}; it takes {list(PARAMS)}")
    fields: dict[str, Any] = {}
    for name, rule in SAMPLING.items():
        value = params.get(name)
        if value is None:
            continue
        fields[name] = _number(model, name, value, rule)
    fields.setdefault("max_tokens", default_max_tokens)
    if "repetition_penalty" in fields and flavor == "llama-cpp-python":
        fields["repeat_penalty"] = fields.pop("repetition_penalty")
    stop = params.get("stop")
    if stop is not None:
        fields["stop"] = _stop(model, stop)
    if params.get("tools") is not None:
        fields["tools"] = parse_tools(model, params["tools"])
    if params.get("tool_choice") is not None:
        if "tools" not in fields:
            raise BadInput(f"{model}: param 'tool_choice' needs 'tools'")
        fields["tool_choice"] = parse_tool_choice(model, params["tool_choice"])
    adapter = params.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise BadInput(f"{model}: param 'adapter' must be a non-empty string")
    return Sampling(fields, adapter, int(fields["max_tokens"]))


def _number(model: str, name: str, value: Param, rule: Number) -> int | float:
    if rule.integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        kind = "a number"
    if not ok or not rule.low <= value <= rule.high:  # type: ignore[operator]
        raise BadInput(f"{model}: param {name!r} must be {kind} from {rule.low:g} to {rule.high:g}")
    return value if rule.integer else float(value)  # type: ignore[arg-type,return-value]


def _stop(model: str, stop: Param) -> list[str]:
    items = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(items, list)
        or not 1 <= len(items) <= MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
    ):
        raise BadInput(
            f"{model}: param 'stop' must be 1 to {MAX_STOP} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters"
        )
    return list(items)


def parse_messages(model: str, text: str) -> list[dict[str, Any]]:
    """The ``messages`` input: a JSON array of {"role", "content"[, "name"]} objects;
    an assistant's may carry ``tool_calls`` instead of content, and a ``tool``
    message answers one by its ``tool_call_id`` (see openai_tools)."""
    try:
        data = bounded_json.loads(text)
    except bounded_json.BadJSON as exc:
        raise BadInput(f"{model}: input 'messages' is {exc}") from None
    if not isinstance(data, list) or not 1 <= len(data) <= MAX_MESSAGES:
        raise BadInput(f"{model}: input 'messages' must be a JSON array of 1 to {MAX_MESSAGES}")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(data):
        where = f"{model}: messages[{i}]"
        if not isinstance(item, dict) or set(item) - MESSAGE_KEYS:
            raise BadInput(f"{where} must be an object with {sorted(MESSAGE_KEYS)} only")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise BadInput(f"{where}.role must be one of {sorted(ROLES)}")
        calls_only = content is None and item.get("tool_calls") is not None
        if not isinstance(content, str) and not calls_only:
            raise BadInput(f"{where}.content must be a string")
        if "name" in item and not isinstance(item["name"], str):
            raise BadInput(f"{where}.name must be a string")
        check_tool_fields(where, item)
        messages.append(dict(item))
    return messages


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    tool_calls: list[dict[str, Any]] | None = None  # complete calls, when it called tools


def parse_completion(where: str, body: Any, *, chat: bool) -> Completion:
    """The first choice of a (chat) completion answer, and its token usage."""
    choice = _first_choice(where, body)
    calls = None
    if chat:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if text is None and isinstance(message, dict):
            text = ""  # a reply of only tool calls or a refusal carries no content
        if isinstance(message, dict) and message.get("tool_calls"):
            calls = parse_tool_calls(where, message["tool_calls"])
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        raise BackendGarbage(f"{where}: the answer's choice has no text")
    prompt_tokens, completion_tokens = usage(body)
    return Completion(text, _finish(choice), prompt_tokens, completion_tokens, calls)


def parse_chunk(where: str, body: Any, *, chat: bool) -> Completion:
    """One streamed chunk: its text delta (maybe empty), finish_reason and usage if any."""
    if isinstance(body, dict) and "error" in body:
        raise BackendFailed(f"{where}: the stream failed: {error_message(body)}")
    prompt_tokens, completion_tokens = usage(body)
    choices = body.get("choices") if isinstance(body, dict) else None
    if choices == [] and prompt_tokens is not None:  # the usage-only last chunk
        return Completion("", None, prompt_tokens, completion_tokens)
    choice = _first_choice(where, body)
    if chat:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
        text = "" if text is None and isinstance(delta, dict) else text
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        raise BackendGarbage(f"{where}: a stream chunk has no text")
    return Completion(text, _finish(choice), prompt_tokens, completion_tokens)


def _first_choice(where: str, body: Any) -> dict[str, Any]:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendGarbage(f"{where}: the answer has no choices")
    return choices[0]


def _finish(choice: Mapping[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) else None


def usage(body: Any) -> tuple[int | None, int | None]:
    found = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(found, dict):
        return None, None
    prompt, completion = found.get("prompt_tokens"), found.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def error_message(body: Mapping[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:400]


def parse_embeddings(where: str, body: Any, count: int, *, pool: bool) -> list[list[float]]:
    """``data[*].embedding`` ordered by ``index``: ``count`` rows of one width.

    A server whose model has no pooling (llama.cpp with a generative model)
    answers one vector per token; with ``pool`` those are averaged here,
    otherwise such an answer is refused.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise BackendGarbage(f"{where}: expected {count} embeddings in 'data'")
    rows: list[list[float] | None] = [None] * count
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or rows[index] is not None:
            raise BackendGarbage(f"{where}: embedding indexes are not 0..{count - 1}")
        if pool and isinstance(vector, list) and vector and isinstance(vector[0], list):
            tokens = check_matrix(where, vector, len(vector))
            vector = [sum(column) / len(tokens) for column in zip(*tokens, strict=True)]
        rows[index] = vector
    return check_matrix(where, rows, count)


def check_matrix(where: str, rows: Any, count: int) -> list[list[float]]:
    """``rows`` as ``count`` float vectors of one non-zero width, all finite."""
    if not isinstance(rows, list) or len(rows) != count:
        raise BackendGarbage(f"{where}: expected {count} embeddings")
    width = len(rows[0]) if rows and isinstance(rows[0], list) else 0
    for row in rows:
        if (
            not isinstance(row, list)
            or not row
            or len(row) != width
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in row
            )
        ):
            raise BackendGarbage(f"{where}: embeddings are not {count} finite vectors of one width")
    return rows


class SSEParser:
    """Server-Sent Events, line by line: ``feed`` returns an event's data when it ends.

    Per the HTML standard: ``data:`` lines accumulate (joined by newlines), a
    blank line dispatches, lines starting with ``:`` are comments, other
    fields (``event``, ``id``, ``retry``) are ignored here.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def end(self) -> str | None:
        """Data of a last event the stream did not end with a blank line."""
        return self.feed("")
