"""Anthropic's Messages API: ``POST /v1/messages``, one swarm job per message.

What a body may say, and what becomes of it (``generate`` runs the job):

- ``system``: a string or text blocks, the conversation's system turn;
  ``messages``: user and assistant turns whose content is a string or
  blocks: ``text`` blocks (joined), an assistant's ``tool_use`` blocks (its
  tool calls) and a user's ``tool_result`` blocks (a tool turn answering
  ``tool_use_id``; with ``is_error`` its text begins "Error: ").
  ``cache_control`` on a block changes nothing here.
- ``max_tokens`` (required, as Anthropic requires it), ``stop_sequences``,
  ``temperature``, ``top_p``, ``top_k``; ``metadata`` changes nothing.
- ``tools`` (``{name, description, input_schema}``) go in chat's shape to
  models on OpenAI-compatible backends, like chat's tools; ``tool_choice``
  ``auto``, ``any`` (required), ``tool`` (by name) or ``none``.
- The answer: ``content`` holds a ``text`` block and a ``tool_use`` block
  per call (``input`` the call's arguments), ``stop_reason`` is ``end_turn``,
  ``max_tokens`` or ``tool_use``, ``usage`` the token counts the model
  reported (0 where it did not). The swarm does not say which stop sequence
  ended a text, so one that did reads ``end_turn`` with ``stop_sequence``
  null. Its ``id`` (``msg_...``) is the swarm job's request id.
- ``stream: true``: ``message_start``, ``content_block_start``,
  ``content_block_delta`` (``text_delta``)..., ``content_block_stop``; per
  tool call a ``tool_use`` block whose input comes whole in one
  ``input_json_delta``; then ``message_delta`` (stop reason, output tokens)
  and ``message_stop``. A failure after the first event is an ``error`` event.

Errors take Anthropic's shape and statuses (``errors``): 400
``invalid_request_error``, 401 ``authentication_error``, 404
``not_found_error``, 413 ``request_too_large``, 529 ``overloaded_error``
(the swarm full or unable to run it now), 504 ``timeout_error``, 500
``api_error``. The token may come as ``x-api-key``, as Anthropic's SDK sends
it, or as a bearer header. Refused by name (400): image, document and
thinking blocks, extended thinking, server tools (web search, code
execution...), MCP servers, containers, and any field this module does not
know.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .app import Backend, find_model, guarded, json_object, read_json
from .config import GatewayConfig
from .errors import ANTHROPIC_PATH as PATH
from .errors import HTTPFailure, error_body
from .generate import (
    Answer,
    Sampling,
    arguments,
    complete,
    integer,
    job,
    not_text,
    number,
    params,
    produce,
    refuse,
    strings,
    tool_params,
    wants_stream,
)
from .sse import EventStream

KNOWN = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "tools",
        "tool_choice",
        "metadata",
    }
)
NOT_TEXT = {"image": "an image", "document": "a document"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # else end_turn
CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def routes(backend: Backend, config: GatewayConfig) -> list[Route]:
    @guarded(config)
    async def create(request: HTTPRequest) -> Response:
        body = json_object(await read_json(request, config.max_body))
        refuse([k for k, v in body.items() if k not in KNOWN and v is not None])
        model = find_model(backend, body.get("model"))
        if body.get("max_tokens") is None:
            raise HTTPFailure(400, "max_tokens: Field required", "invalid_input")
        turns = conversation(body, model)
        tools = tool_params(model, chat_tools(body.get("tools")), chat_choice(body))
        limit = integer(body, "max_tokens")
        if limit is None or limit < 1:
            raise HTTPFailure(400, "max_tokens: must be at least 1", "invalid_input")
        sampling = Sampling(
            max_tokens=limit,
            temperature=number(body, "temperature"),
            top_p=number(body, "top_p"),
            top_k=integer(body, "top_k"),
            stop=strings(body, "stop_sequences"),
        )
        wanted = wants_stream(body)
        ident, name = f"msg_{uuid.uuid4().hex}", str(model["name"])
        chosen = params(model, sampling, tools)
        swarm_job = job(ident, request, model, messages=turns, params=chosen, stream=wanted)
        if not wanted:
            return JSONResponse(message(ident, name, await complete(backend, request, swarm_job)))
        streamed = produce(backend, swarm_job, Events(ident, name))

        def failed(status: int, text: str, code: str) -> dict[str, Any]:
            return error_body(status, text, code, path=PATH)

        return EventStream(streamed, named=True, path=PATH, failed=failed)

    return [Route(PATH, create, methods=["POST"])]


def conversation(body: Mapping[str, Any], model: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``system`` and ``messages`` as OpenAI chat's turns."""
    turns: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        turns.append({"role": "system", "content": _text("system", system, model)})
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise HTTPFailure(400, "messages: must be a non-empty list", "invalid_input")
    for i, item in enumerate(given):
        where = f"messages.{i}"
        role = item.get("role") if isinstance(item, dict) else None
        if role not in ("user", "assistant"):
            raise HTTPFailure(400, f"{where}.role: must be user or assistant", "invalid_input")
        content = item.get("content")
        if isinstance(content, str):
            turns.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            message = f"{where}.content: must be a string or a list of blocks"
            raise HTTPFailure(400, message, "invalid_input")
        texts: list[dict[str, Any]] = []
        calls, results = [], []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_use" and role == "assistant":
                calls.append(_call(at, block))
            elif kind == "tool_result" and role == "user":
                answer = _text(f"{at}.content", block.get("content", ""), model)
                if block.get("is_error"):  # chat's tool turns have no flag: the text says it
                    answer = f"Error: {answer}"
                results.append({"role": "tool", "tool_call_id": _id(at, block), "content": answer})
            else:
                texts.append(block)
        text = _text(where + ".content", texts, model) if texts else ""
        if calls:
            turns.append({"role": "assistant", "content": text or None, "tool_calls": calls})
            continue
        turns.extend(results)  # a tool's answers come first, then what the user said
        if texts or not results:
            turns.append({"role": role, "content": text})
    return turns


def _text(where: str, content: Any, model: Mapping[str, Any]) -> str:
    """A string, or text blocks joined; other blocks refused by name."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        message = f"{where}: must be a string or a list of text blocks"
        raise HTTPFailure(400, message, "invalid_input")
    parts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in NOT_TEXT:
            raise not_text(f"{where}.{j}", NOT_TEXT[str(kind)], model)
        if kind != "text" or not isinstance(block.get("text"), str):
            message = f"{where}.{j}: blocks of type {kind!r} are not supported by this gateway"
            raise HTTPFailure(400, message, "unsupported_content")
        parts.append(block["text"])
    return "".join(parts)


def _id(where: str, block: Mapping[str, Any]) -> str:
    key = "id" if block.get("type") == "tool_use" else "tool_use_id"
    value = block.get(key)
    if not isinstance(value, str) or not value:
        raise HTTPFailure(400, f"{where}.{key}: must be a string", "invalid_input")
    return value


def _call(where: str, block: Mapping[str, Any]) -> dict[str, Any]:
    """A ``tool_use`` block as chat's tool call."""
    name, given = block.get("name"), block.get("input", {})
    if not isinstance(name, str) or not isinstance(given, dict):
        message = f"{where}: a tool_use block needs a name and an input object"
        raise HTTPFailure(400, message, "invalid_input")
    function = {"name": name, "arguments": json.dumps(given)}
    return {"id": _id(where, block), "type": "function", "function": function}


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Client tools in chat's shape; server tools (with a ``type``) are refused by name."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise HTTPFailure(400, "tools: must be a list", "invalid_input")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "custom") if isinstance(tool, dict) else None
        if kind != "custom" or not isinstance(tool.get("name"), str):
            message = f"tools.{i}: only client tools with a name are supported, not {kind!r}"
            raise HTTPFailure(400, message, "unsupported_parameter")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or {}}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def chat_choice(body: Mapping[str, Any]) -> Any:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind not in CHOICES:
        message = "tool_choice: must be {'type': auto, any, tool (with a name) or none}"
        raise HTTPFailure(400, message, "invalid_input")
    return CHOICES[str(kind)]


def stop_reason(answer: Answer) -> str:
    return STOP_REASONS.get(answer.finish_reason, "end_turn")


def usage(answer: Answer) -> dict[str, int]:
    return {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens}


def tool_use(call: Mapping[str, Any], given: dict[str, Any] | None = None) -> dict[str, Any]:
    name = call["function"]["name"]
    value = arguments(call) if given is None else given
    return {"type": "tool_use", "id": call["id"], "name": name, "input": value}


def message(ident: str, model: str, answer: Answer) -> dict[str, Any]:
    """The whole answer, not streamed."""
    content: list[dict[str, Any]] = []
    if answer.text or not answer.tool_calls:
        content.append({"type": "text", "text": answer.text})
    content += [tool_use(call) for call in answer.tool_calls]
    return {**_head(ident, model, content, usage(answer)), "stop_reason": stop_reason(answer)}


def _head(ident: str, model: str, content: list[Any], counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": counts,
    }


class Events:
    """A streamed message's events, in Anthropic's order. Pure: each method returns
    the events to write; nothing is written before the first piece of text (or
    the end), so a job that fails before any output is a plain HTTP error."""

    def __init__(self, ident: str, model: str) -> None:
        self.ident, self.model = ident, model
        self.opened = self.writing = False
        self.blocks = 0  # content blocks so far

    def _open(self) -> list[dict[str, Any]]:
        if self.opened:
            return []
        self.opened = True
        start = _head(self.ident, self.model, [], {"input_tokens": 0, "output_tokens": 0})
        return [{"type": "message_start", "message": start}]

    def _block(self) -> list[dict[str, Any]]:
        if self.writing:
            return []
        self.writing = True
        block = {"type": "text", "text": ""}
        return [*self._open(), {"type": "content_block_start", "index": 0, "content_block": block}]

    def text(self, piece: str) -> list[dict[str, Any]]:
        delta = {"type": "text_delta", "text": piece}
        return [*self._block(), {"type": "content_block_delta", "index": 0, "delta": delta}]

    def end(self, answer: Answer) -> list[dict[str, Any]]:
        out, index = self._open(), 0
        if answer.text or not answer.tool_calls:
            out += [*self._block(), {"type": "content_block_stop", "index": 0}]
            index = 1
        for i, call in enumerate(answer.tool_calls, start=index):
            partial = json.dumps(arguments(call))
            delta = {"type": "input_json_delta", "partial_json": partial}
            out += [
                {"type": "content_block_start", "index": i, "content_block": tool_use(call, {})},
                {"type": "content_block_delta", "index": i, "delta": delta},
                {"type": "content_block_stop", "index": i},
            ]
        reason = {"stop_reason": stop_reason(answer), "stop_sequence": None}
        out.append({"type": "message_delta", "delta": reason, "usage": usage(answer)})
        out.append({"type": "message_stop"})
        return out
