"""OpenAI's Responses API: ``POST /v1/responses``, one swarm job per response.

What a body may say, and what becomes of it (``generate`` runs the job):

- ``input``: a string (one user turn) or a list of items: messages ``{role,
  content}`` whose content is a string or ``input_text`` / ``output_text``
  parts; ``function_call`` items (an assistant's calls, consecutive ones one
  turn) and ``function_call_output`` items (a tool's answer to ``call_id``).
  ``instructions`` is a system turn before them; the ``developer`` role is
  sent as ``system``, the role generation runners know.
- ``tools``: function tools (``{type: function, name, parameters, ...}``),
  sent in chat's shape to models on OpenAI-compatible backends, like chat's
  tools; ``tool_choice`` auto, none, required or ``{type: function, name}``.
- ``max_output_tokens``, ``temperature``, ``top_p``; ``metadata`` is echoed;
  ``user``, ``safety_identifier`` and ``prompt_cache_key`` change nothing.
- The answer: ``output`` holds a ``message`` item with one ``output_text``
  part and a ``function_call`` item per call the model made; ``status`` is
  ``completed``, or ``incomplete`` (``max_output_tokens``) when the model
  stopped at the limit; ``usage`` counts input and output tokens as the model
  reported them (0 where it did not). Its ``id`` is the swarm job's request
  id, which every node's log carries.
- ``stream: true``: Server-Sent Events named by type, each with its
  ``sequence_number`` from 0: ``response.created``, ``response.in_progress``,
  ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta``..., ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done``, per call
  ``response.output_item.added``, ``response.function_call_arguments.delta``
  (the whole arguments: calls arrive whole), ``...arguments.done``,
  ``response.output_item.done``, then ``response.completed`` (or
  ``response.incomplete``). A failure after the first event is an ``error``
  event.

Refused by name (400), never ignored: stored responses and conversations
(``previous_response_id``, ``conversation``, ``store: true``, ``background``,
``prompt``), ``include``, ``reasoning``, ``text`` formats other than plain
text, ``top_logprobs``, ``truncation: auto``, ``max_tool_calls``,
``parallel_tool_calls: false``, tools other than functions, image, file and
audio input, and any field this module does not know.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .app import Backend, find_model, guarded, json_object, read_json
from .config import GatewayConfig
from .errors import HTTPFailure
from .generate import (
    Answer,
    Sampling,
    complete,
    job,
    limit,
    not_text,
    number,
    params,
    produce,
    refuse,
    tool_params,
    wants_stream,
)
from .sse import EventStream

PATH = "/v1/responses"
KNOWN = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "stream",
        "stream_options",
        "store",
        "text",
        "truncation",
        "metadata",
        "user",
        "safety_identifier",
        "prompt_cache_key",
    }
)
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = frozenset({"input_text", "output_text"})
NOT_TEXT = {"input_image": "an image", "input_file": "a file", "input_audio": "audio"}


def routes(backend: Backend, config: GatewayConfig) -> list[Route]:
    @guarded(config)
    async def create(request: HTTPRequest) -> Response:
        body = json_object(await read_json(request, config.max_body))
        model = find_model(backend, body.get("model"))
        _refused(body)
        turns = conversation(body, model)
        tools = tool_params(
            model, chat_tools(body.get("tools")), chat_choice(body.get("tool_choice"))
        )
        sampling = Sampling(
            max_tokens=limit(body, "max_output_tokens"),
            temperature=number(body, "temperature"),
            top_p=number(body, "top_p"),
        )
        wanted = wants_stream(body)
        ident = f"resp_{uuid.uuid4().hex}"
        chosen = params(model, sampling, tools)
        swarm_job = job(ident, request, model, messages=turns, params=chosen, stream=wanted)
        shape = Shape(ident, str(model["name"]), body)
        if not wanted:
            return JSONResponse(shape.finished(await complete(backend, request, swarm_job)))
        events = Events(shape)
        streamed = produce(backend, swarm_job, events)
        return EventStream(streamed, named=True, path=PATH, failed=events.error)

    return [Route(PATH, create, methods=["POST"])]


def _refused(body: Mapping[str, Any]) -> None:
    """400 naming every field set that this gateway cannot honour (see the module)."""
    names = [k for k, v in body.items() if k not in KNOWN and v is not None]
    for key, fine in (("store", False), ("parallel_tool_calls", True)):
        if body.get(key) not in (None, fine):
            names.append(f"{key}: {body[key]!r}")
    if body.get("truncation") not in (None, "disabled"):
        names.append(f"truncation: {body['truncation']!r}")
    text = body.get("text")
    form = text.get("format") if isinstance(text, dict) else None
    if text is not None and (not isinstance(text, dict) or form not in (None, {"type": "text"})):
        names.append("text.format other than plain text")
    refuse(names)


def conversation(body: Mapping[str, Any], model: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as OpenAI chat's turns."""
    turns: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise HTTPFailure(400, "'instructions' must be a string", "invalid_input")
        turns.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        turns.append({"role": "user", "content": given})
        return turns
    if not isinstance(given, list) or not given:
        message = "'input' must be a string or a non-empty list of items"
        raise HTTPFailure(400, message, "invalid_input")
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise HTTPFailure(400, f"{where} must be an object", "invalid_input")
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(str(item.get("role")))
            if role is None:
                message = f"{where}.role must be one of {sorted(ROLES)}"
                raise HTTPFailure(400, message, "invalid_input")
            turns.append({"role": role, "content": _text(where, item.get("content"), model)})
        elif kind == "function_call":
            call = {
                "id": _field(where, item, "call_id"),
                "type": "function",
                "function": {
                    "name": _field(where, item, "name"),
                    "arguments": _field(where, item, "arguments"),
                },
            }
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one turn, as chat has it
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _text(f"{where}.output", item.get("output"), model)
            call_id = _field(where, item, "call_id")
            turns.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            message = f"{where}: items of type {kind!r} are not supported by this gateway"
            raise HTTPFailure(400, message, "unsupported_parameter")
    return turns


def _text(where: str, content: Any, model: Mapping[str, Any]) -> str:
    """A message's content: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HTTPFailure(400, f"{where} must be a string or a list of parts", "invalid_input")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise HTTPFailure(400, f"{where}[{j}] must be an object", "invalid_input")
        kind = str(part.get("type"))
        if kind in NOT_TEXT:
            raise not_text(f"{where}[{j}]", NOT_TEXT[kind], model)
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            message = f"{where}[{j}] must be an input_text or output_text part"
            raise HTTPFailure(400, message, "invalid_input")
        parts.append(part["text"])
    return "".join(parts)


def _field(where: str, item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not value and key != "arguments"):
        raise HTTPFailure(400, f"{where}.{key} must be a string", "invalid_input")
    return value


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Function tools in chat's shape; any other kind is refused by name."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise HTTPFailure(400, "'tools' must be a list", "invalid_input")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            message = f"tools[{i}]: tools of type {kind!r} are not supported, only functions"
            raise HTTPFailure(400, message, "unsupported_parameter")
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        out.append({"type": "function", "function": function})
    return out


def chat_choice(choice: Any) -> Any:
    """``tool_choice`` in chat's shape."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    message = "'tool_choice' must be auto, none, required or {'type': 'function', 'name': ...}"
    raise HTTPFailure(400, message, "unsupported_parameter")


class Shape:
    """The Response objects of one request, as they are at each step."""

    def __init__(self, ident: str, model: str, body: Mapping[str, Any]) -> None:
        self.ident, self.model, self.body = ident, model, body
        self.created = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def response(
        self, status: str, output: list[dict[str, Any]], answer: Answer | None = None
    ) -> dict[str, Any]:
        body = self.body
        incomplete = answer is not None and answer.truncated
        usage = None
        if answer is not None:
            p, c = answer.prompt_tokens, answer.completion_tokens
            usage = {
                "input_tokens": p,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": c,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": p + c,
            }
        return {
            "id": self.ident,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": body.get("temperature"),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p"),
            "truncation": "disabled",
            "usage": usage,
            "user": body.get("user"),
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    @staticmethod
    def call(call: Mapping[str, Any], status: str) -> dict[str, Any]:
        function = call["function"]
        return {
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "call_id": call["id"],
            "name": function["name"],
            "arguments": function["arguments"],
            "status": status,
        }

    def output(self, answer: Answer) -> list[dict[str, Any]]:
        message = answer.text or not answer.tool_calls
        items = [self.message(answer.text, "completed")] if message else []
        return items + [self.call(c, "completed") for c in answer.tool_calls]

    def status(self, answer: Answer) -> str:
        return "incomplete" if answer.truncated else "completed"

    def finished(self, answer: Answer) -> dict[str, Any]:
        return self.response(self.status(answer), self.output(answer), answer)


class Events:
    """A streamed response's events, in the documented order, numbered from 0.

    Pure: each method returns the events to write. Nothing is written before the
    first piece of text (or the end), so a job that fails before any output is a
    plain HTTP error with its status."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.seq = 0
        self.opened = self.writing = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _open(self) -> list[dict[str, Any]]:
        """response.created and response.in_progress, once."""
        if self.opened:
            return []
        self.opened = True
        start = self.shape.response("in_progress", [])
        return [
            self._event("response.created", response=start),
            self._event("response.in_progress", response=start),
        ]

    def _message(self) -> list[dict[str, Any]]:
        """The message item and its text part, added once."""
        if self.writing:
            return []
        self.writing = True
        shape = self.shape
        item = shape.message("", "in_progress")
        return [
            *self._open(),
            self._event("response.output_item.added", output_index=0, item=item),
            self._event("response.content_part.added", **self._where(), part=shape.part("")),
        ]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.shape.message_id, "output_index": 0, "content_index": 0}

    def text(self, piece: str) -> list[dict[str, Any]]:
        delta = {"delta": piece, "logprobs": []}
        return [
            *self._message(),
            self._event("response.output_text.delta", **self._where(), **delta),
        ]

    def end(self, answer: Answer) -> list[dict[str, Any]]:
        """The events after the last piece of text: the items done, then the response."""
        shape, text, out = self.shape, answer.text, self._open()
        output = []
        if text or not answer.tool_calls:
            item, where = shape.message(text, "completed"), self._where()
            out += [
                *self._message(),
                self._event("response.output_text.done", **where, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, part=shape.part(text)),
                self._event("response.output_item.done", output_index=0, item=item),
            ]
            output.append(item)
        for call in answer.tool_calls:
            index, done = len(output), shape.call(call, "completed")
            added = {**done, "arguments": "", "status": "in_progress"}
            where, arguments = {"item_id": done["id"], "output_index": index}, done["arguments"]
            out += [
                self._event("response.output_item.added", output_index=index, item=added),
                self._event("response.function_call_arguments.delta", **where, delta=arguments),
                self._event("response.function_call_arguments.done", **where, arguments=arguments),
                self._event("response.output_item.done", output_index=index, item=done),
            ]
            output.append(done)
        status = shape.status(answer)
        out.append(
            self._event(f"response.{status}", response=shape.response(status, output, answer))
        )
        return out

    def error(self, status: int, message: str, code: str) -> dict[str, Any]:
        return self._event("error", code=code, message=message, param=None)
