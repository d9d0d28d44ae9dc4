"""Ollama's API under ``/api/``: every model the swarm serves, as Ollama's clients see models.

Routes, each answering in Ollama's shapes (its docs/api.md):

- ``GET /api/version``; ``GET /api/tags`` and ``GET /api/ps``: every model
  the swarm serves (served means loaded somewhere, so ``ps`` lists them all,
  never expiring), ``details.format`` its runner, ``family`` its task,
  ``quantization_level`` its precision; ``size`` and ``digest`` say nothing
  real (0, and a hash of the name); ``POST /api/show``: the same, with
  ``capabilities`` (``completion``, ``embedding``, ``tools`` for models on
  OpenAI-compatible backends) and ``model_info`` (task, runner, device,
  context length).
- ``POST /api/chat``: ``messages`` (system, user, assistant and tool turns;
  an assistant's ``tool_calls`` with argument objects, a tool's answer going
  to the earliest unanswered call of its ``tool_name``), ``tools`` for models
  that call tools, as on chat. ``POST /api/generate``: ``prompt`` as a user
  turn, after ``system`` (or continued as it is with ``raw``); an empty
  prompt answers ``done_reason: load`` at once, as Ollama does.
- ``options``: ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
  ``repeat_penalty`` and ``num_predict`` (the limit on new tokens; 0 or less
  means the runner's own limit). ``keep_alive`` changes nothing (the swarm
  decides what stays loaded).
- Streaming as Ollama does it: NDJSON, on unless ``stream: false``; each
  line a piece of the message (or ``response``), tool calls in a line of their
  own, then a last line with ``done: true``, ``done_reason`` (stop or length),
  ``prompt_eval_count``, ``eval_count`` (the tokens the model reported, 0
  where it did not) and ``total_duration`` (ns). A failure after the first
  line is a last ``{"error": ...}`` line.
- ``POST /api/embed`` (``input``: a string or a list) and the older ``POST
  /api/embeddings`` (``prompt``): the model's vectors as it gives them
  (all-MiniLM-L6-v2's are unit length, as Ollama's embed gives them).

Errors are Ollama's ``{"error": "..."}`` with its statuses (404 for a model
no node serves: "model 'x' not found"). Ollama's clients send no token by
default: give the gateway's as ``OLLAMA_API_KEY`` (the ``ollama`` client
sends it as a bearer header) or as ``headers={"Authorization": "Bearer
..."}``. Refused by name (400): images, ``format`` (JSON output), ``think``,
``logprobs``, ``suffix``, ``template``, ``context``, options other than the
ones above, ``truncate: false``, ``dimensions``, and any field this module
does not know. Each answer's ``x-request-id`` header is the swarm job's
request id, which every node's log carries.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocols import Request
from runners.remote.openai_compat import RUNNER as OPENAI_RUNNER

from .app import Backend, find_model, guarded, json_object, read_json
from .config import GatewayConfig
from .errors import HTTPFailure
from .generate import (
    EMBEDDING_TASKS,
    GENERATION_TASKS,
    Answer,
    Sampling,
    arguments,
    check_task,
    complete,
    embed,
    input_texts,
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
from .sse import NDJSONStream

VERSION = "0.12.0"  # the Ollama release whose documented API these routes follow
EPOCH = "1970-01-01T00:00:00Z"  # models here have no file, so no modification time
NEVER = "9999-12-31T23:59:59Z"  # served models stay loaded as far as a client can tell
COMMON = frozenset({"model", "stream", "options", "keep_alive"})
CHAT_FIELDS = COMMON | {"messages", "tools"}
GENERATE_FIELDS = COMMON | {"prompt", "system", "raw"}
EMBED_FIELDS = frozenset({"model", "input", "truncate", "keep_alive"})
EMBEDDINGS_FIELDS = frozenset({"model", "prompt", "keep_alive"})
# Set to anything but these, the fields that change an answer are refused by name.
OFF: dict[str, tuple[Any, ...]] = {
    "format": (None, ""),
    "think": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "images": (None, []),
    "suffix": (None, ""),
    "template": (None, ""),
    "context": (None, []),
    "truncate": (None, True),
}
OPTIONS = {"temperature", "top_p", "top_k", "seed", "stop", "repeat_penalty", "num_predict"}
ROLES = frozenset({"system", "user", "assistant", "tool"})


def routes(backend: Backend, config: GatewayConfig) -> list[Route]:
    guard = guarded(config)

    def model_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
        name = body.get("model") or body.get("name")  # older clients say "name"
        try:
            return find_model(backend, name)
        except HTTPFailure as exc:  # Ollama's words, which clients match to offer a pull
            if exc.status == 404:
                message = f"model {name!r} not found: no node of this swarm serves it"
                raise HTTPFailure(404, message, exc.code) from None
            raise

    async def read(request: HTTPRequest, known: frozenset[str]) -> dict[str, Any]:
        body = json_object(await read_json(request, config.max_body))
        names = [k for k, v in body.items() if k not in known | set(OFF) and v is not None]
        names += [k for k, fine in OFF.items() if k in body and body[k] not in fine]
        refuse(names)
        return body

    @guard
    async def version(request: HTTPRequest) -> Response:
        return JSONResponse({"version": VERSION})

    @guard
    async def tags(request: HTTPRequest) -> Response:
        return JSONResponse({"models": [entry(d) for d in _sorted(backend)]})

    @guard
    async def running(request: HTTPRequest) -> Response:
        models = [
            {
                **entry(d),
                "expires_at": NEVER,
                "size_vram": 0,
                "context_length": d.get("context_length"),
            }
            for d in _sorted(backend)
        ]
        return JSONResponse({"models": models})

    @guard
    async def show(request: HTTPRequest) -> Response:
        described = model_of(json_object(await read_json(request, config.max_body)))
        return JSONResponse(shown(described))

    @guard
    async def chat(request: HTTPRequest) -> Response:
        began, body = time.perf_counter_ns(), await read(request, CHAT_FIELDS)
        model = model_of(body)
        turns = conversation(body.get("messages"), model)
        tools = tool_params(model, body.get("tools"), None)
        ident, wanted = _request_id(), wants_stream(body, default=True)
        chosen = params(model, sampling(body.get("options")), tools)
        swarm_job = job(ident, request, model, messages=turns, params=chosen, stream=wanted)
        return await _answer(backend, request, swarm_job, Lines(model, began, chat=True), ident)

    @guard
    async def generate(request: HTTPRequest) -> Response:
        began, body = time.perf_counter_ns(), await read(request, GENERATE_FIELDS)
        model = model_of(body)
        prompt, system, raw = body.get("prompt") or "", body.get("system"), body.get("raw")
        if not isinstance(prompt, str) or not isinstance(system, str | None):
            raise HTTPFailure(400, "'prompt' and 'system' must be strings", "invalid_input")
        lines = Lines(model, began, chat=False)
        if not prompt:  # Ollama's way to load a model: nothing to generate
            return JSONResponse(
                {**lines.head(), "response": "", "done": True, "done_reason": "load"}
            )
        ident, wanted = _request_id(), wants_stream(body, default=True)  # as Ollama does
        chosen = params(model, sampling(body.get("options")))
        if raw:
            if system:
                raise HTTPFailure(400, "'system' has no place in a raw prompt", "invalid_input")
            swarm_job = job(ident, request, model, prompt=prompt, params=chosen, stream=wanted)
        else:
            turns = [{"role": "system", "content": system}] if system else []
            turns.append({"role": "user", "content": prompt})
            swarm_job = job(ident, request, model, messages=turns, params=chosen, stream=wanted)
        return await _answer(backend, request, swarm_job, lines, ident)

    @guard
    async def embed_many(request: HTTPRequest) -> Response:
        began, body = time.perf_counter_ns(), await read(request, EMBED_FIELDS)
        model = model_of(body)
        rows, tokens = await embed(backend, request, model, input_texts(body, "input"))
        took = time.perf_counter_ns() - began
        answer = {
            "model": model["name"],
            "embeddings": rows.tolist(),
            "total_duration": took,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
        return JSONResponse(answer)

    @guard
    async def embed_one(request: HTTPRequest) -> Response:
        body = await read(request, EMBEDDINGS_FIELDS)
        model = model_of(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise HTTPFailure(400, "'prompt' must be a string", "invalid_input")
        if not prompt:  # Ollama answers an empty prompt with an empty vector
            check_task(model, EMBEDDING_TASKS, "embeddings")
            return JSONResponse({"embedding": []})
        rows, _tokens = await embed(backend, request, model, [prompt])
        return JSONResponse({"embedding": rows[0].tolist()})

    return [
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", running, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/embed", embed_many, methods=["POST"]),
        Route("/api/embeddings", embed_one, methods=["POST"]),
    ]


def _sorted(backend: Backend) -> list[Mapping[str, Any]]:
    return sorted(backend.models().values(), key=lambda d: str(d["name"]))


def _request_id() -> str:
    return f"ollama-{uuid.uuid4().hex}"


def details(described: Mapping[str, Any]) -> dict[str, Any]:
    task = str(described.get("task", ""))
    return {
        "parent_model": "",
        "format": str(described.get("runner", "")),
        "family": task,
        "families": [task],
        "parameter_size": "",
        "quantization_level": str(described.get("precision", "")),
    }


def entry(described: Mapping[str, Any]) -> dict[str, Any]:
    name = str(described["name"])
    return {
        "name": name,
        "model": name,
        "modified_at": EPOCH,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": details(described),
    }


def capabilities(described: Mapping[str, Any]) -> list[str]:
    task, out = described.get("task"), []
    if task in GENERATION_TASKS:
        out.append("completion")
    if task in EMBEDDING_TASKS:
        out.append("embedding")
    if task == "text-generation" and described.get("runner") == OPENAI_RUNNER:
        out.append("tools")
    return out


def shown(described: Mapping[str, Any]) -> dict[str, Any]:
    info = {
        "general.architecture": str(described.get("runner", "")),
        "swarm.task": described.get("task"),
        "swarm.device": described.get("device"),
        "swarm.context_length": described.get("context_length"),
    }
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(described),
        "model_info": info,
        "capabilities": capabilities(described),
        "modified_at": EPOCH,
    }


def sampling(raw: Any) -> Sampling:
    """``options`` as a Sampling; options that would change the answer and that the
    swarm cannot honour are refused by name."""
    if raw is None:
        return Sampling()
    if not isinstance(raw, dict):
        raise HTTPFailure(400, "'options' must be an object", "invalid_input")
    refuse([f"options.{k}" for k, v in raw.items() if k not in OPTIONS and v is not None])
    predict = integer(raw, "num_predict", "options.num_predict")
    return Sampling(
        max_tokens=predict if predict is not None and predict > 0 else None,
        temperature=number(raw, "temperature", "options.temperature"),
        top_p=number(raw, "top_p", "options.top_p"),
        top_k=integer(raw, "top_k", "options.top_k"),
        seed=integer(raw, "seed", "options.seed"),
        stop=strings(raw, "stop", "options.stop"),
        repetition_penalty=number(raw, "repeat_penalty", "options.repeat_penalty"),
    )


def conversation(given: Any, model: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI chat's turns: tool calls get ids (Ollama's have
    none) and a tool's answer goes to the earliest unanswered call of its name."""
    if not isinstance(given, list) or not given:
        raise HTTPFailure(400, "'messages' must be a non-empty list", "invalid_input")
    turns: list[dict[str, Any]] = []
    waiting: list[tuple[str, str]] = []  # (call id, tool name), not yet answered
    for i, item in enumerate(given):
        where = f"messages[{i}]"
        role = item.get("role") if isinstance(item, dict) else None
        if role not in ROLES:
            raise HTTPFailure(400, f"{where}.role must be one of {sorted(ROLES)}", "invalid_input")
        content = item.get("content") or ""
        if not isinstance(content, str):
            raise HTTPFailure(400, f"{where}.content must be a string", "invalid_input")
        if item.get("images"):
            raise not_text(f"{where}.images", "an image", model)
        if item.get("thinking"):
            refuse([f"{where}.thinking"])
        turn: dict[str, Any] = {"role": role, "content": content}
        calls = item.get("tool_calls")
        if calls and role == "assistant":
            turn["tool_calls"] = [
                _call(f"{where}.tool_calls[{k}]", c, i, k) for k, c in enumerate(calls)
            ]
            turn["content"] = content or None
            waiting += [(c["id"], c["function"]["name"]) for c in turn["tool_calls"]]
        elif role == "tool":
            name = item.get("tool_name")
            match = next((w for w in waiting if name in (None, w[1])), None)
            if match is None:
                raise HTTPFailure(400, f"{where} answers no tool call before it", "invalid_input")
            waiting.remove(match)
            turn["tool_call_id"] = match[0]
        turns.append(turn)
    return turns


def _call(where: str, call: Any, turn: int, k: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    given = function.get("arguments", {}) if isinstance(function, dict) else None
    if not isinstance(name, str) or not isinstance(given, dict):
        message = f"{where} must be {{'function': {{'name': ..., 'arguments': {{...}}}}}}"
        raise HTTPFailure(400, message, "invalid_input")
    ident = call.get("id") or f"call_{turn}_{k}"
    return {
        "id": ident,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(given)},
    }


class Lines:
    """The lines of one answer (chat's ``message`` or generate's ``response``)."""

    def __init__(self, model: Mapping[str, Any], began: int, *, chat: bool) -> None:
        self.model, self.began, self.chat = str(model["name"]), began, chat

    def head(self) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return {"model": self.model, "created_at": now}

    def piece(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if not self.chat:
            return {**self.head(), "response": text, "done": False}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"function": {"name": c["function"]["name"], "arguments": arguments(c)}}
                for c in calls
            ]
        return {**self.head(), "message": message, "done": False}

    def done(self, answer: Answer, *, whole: bool) -> dict[str, Any]:
        """The last line of a stream, or (``whole``) the answer not streamed."""
        line = self.piece(answer.text, answer.tool_calls) if whole else self.piece("")
        return {
            **line,
            "done": True,
            "done_reason": "length" if answer.truncated else "stop",
            "total_duration": time.perf_counter_ns() - self.began,
            "prompt_eval_count": answer.prompt_tokens,
            "eval_count": answer.completion_tokens,
        }

    def text(self, piece: str) -> list[dict[str, Any]]:
        return [self.piece(piece)]

    def end(self, answer: Answer) -> list[dict[str, Any]]:
        """Tool calls in a line of their own, as Ollama sends them, then the last line."""
        calls = [self.piece("", answer.tool_calls)] if self.chat and answer.tool_calls else []
        return [*calls, self.done(answer, whole=False)]


async def _answer(
    backend: Backend, http: HTTPRequest, swarm_job: Request, lines: Lines, ident: str
) -> Response:
    headers = {"x-request-id": ident}
    if not swarm_job.stream:
        answer = await complete(backend, http, swarm_job)
        return JSONResponse(lines.done(answer, whole=True), headers=headers)

    def failed(status: int, message: str, code: str) -> dict[str, Any]:
        return {"error": message}

    streamed = produce(backend, swarm_job, lines)
    return NDJSONStream(streamed, path="/api/", failed=failed, headers=headers)
