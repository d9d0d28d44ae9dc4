"""OpenAI-compatible routes: models, embeddings, completions, chat completions.

Each turns the HTTP body into one swarm Request for the model it names and
answers in OpenAI's shapes, so the ``openai`` package, curl scripts and tools
built on them work against any node. Mapping onto swarm's conventions:

- embeddings: ``input`` (a string or a list of strings) is the ``text`` input;
  the ``embedding`` output (float32 [n, d]) gives ``data[i].embedding``, as
  floats or, with ``encoding_format: base64`` (the ``openai`` client's
  default), as base64 of little-endian float32.
- completions: ``prompt`` (one string) is the ``prompt`` input; chat:
  ``messages`` become the ``messages`` input, a JSON string of ``{role,
  content}`` (content parts of type ``text`` are joined).
- ``max_tokens`` (or ``max_completion_tokens``) goes to the param the model's
  runner takes: ``max_tokens`` for OpenAI-compatible backends, else
  ``max_new_tokens`` (generation runners); ``temperature``, ``top_p``,
  ``top_k``, ``seed``, ``stop`` pass as they are.
- models of task ``fake`` (swarm's stand-in for tests, runners/fake.py) take
  the prompt, or the messages' JSON, as their ``text`` input, and no sampling
  params.
- ``stream: true`` answers Server-Sent Events in OpenAI's chunk format, ending
  with ``data: [DONE]``; ``stream_options.include_usage`` adds the usage chunk.
- ``n`` (1 to 8) choices are n swarm jobs run at once, which the router may
  spread over peers; streamed, their chunks carry each choice's ``index``.
- ``tools`` and ``tool_choice`` go to models served by an OpenAI-compatible
  backend as JSON-text params (runners/remote/openai_tools.py); tool turns in
  ``messages`` pass through; an answer's ``tool_calls`` output becomes
  ``message.tool_calls`` (streamed: one delta with the complete calls). Other
  models refuse tools (400 ``unsupported_parameter``), as ``functions``,
  ``logprobs`` and ``top_logprobs`` are refused by name, never silently ignored.
- usage: the token counts the model reported (an embedder's ``tokens`` per
  row summed, or an OpenAI-compatible backend's ``prompt_tokens``), 0 where it
  reported none (TEI, and streams of backends that do not count them).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import trio
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocols import Param, Request, Value
from runners.remote.openai_compat import RUNNER as OPENAI_RUNNER  # takes max_tokens, tools

from .app import (
    Backend,
    execute_all,
    find_model,
    guarded,
    json_object,
    new_id,
    options,
    read_json,
    verify_field,
    verify_headers,
    while_connected,
)
from .config import GatewayConfig
from .errors import HTTPFailure
from .generate import (
    GENERATION_TASKS,
    Sampling,
    count,
    embedded,
    first,
    input_texts,
    integer,
    limit,
    number,
    params,
    refuse,
    strings,
    tool_calls,
    tool_params,
)
from .sse import EventStream, Write

__all__ = ["GENERATION_TASKS", "OPENAI_RUNNER", "routes", "sampling_params"]
MAX_CHOICES = 8  # n: each choice is a job of its own
# Fields a client may rely on that swarm's generation jobs cannot honour yet: refused
# by name rather than ignored, so nobody gets an answer without the tool calls or
# log probabilities they asked for.
UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs")


def routes(backend: Backend, config: GatewayConfig) -> list[Route]:
    guard = guarded(config)

    @guard
    async def list_models(request: HTTPRequest) -> Response:
        data = [_model_entry(d) for d in backend.models().values()]
        data.sort(key=lambda m: m["id"])
        return JSONResponse({"object": "list", "data": data})

    @guard
    async def get_model(request: HTTPRequest) -> Response:
        return JSONResponse(_model_entry(find_model(backend, request.path_params["model"])))

    @guard
    async def embeddings(request: HTTPRequest) -> Response:
        body = json_object(await read_json(request, config.max_body))
        model = find_model(backend, body.get("model"))
        texts = input_texts(body, "input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise HTTPFailure(400, "'encoding_format' must be float or base64", "invalid_input")
        if body.get("dimensions") is not None:
            raise HTTPFailure(400, "'dimensions' is not supported", "unsupported_parameter")
        verify = verify_field(body, options(request).verify)
        rows, tokens, meta = await embedded(backend, request, model, texts, verify=verify)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(row, encoding)}
            for i, row in enumerate(rows)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": model["name"], "usage": usage}
        return JSONResponse(answer, headers=verify_headers([meta]))

    @guard
    async def completions(request: HTTPRequest) -> Response:
        body = json_object(await read_json(request, config.max_body))
        model = find_model(backend, body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise HTTPFailure(400, "'prompt' must be one string", "invalid_input")
        inputs: dict[str, Value] = {"prompt": prompt}
        return await _generate(backend, request, body, model, inputs, chat=False)

    @guard
    async def chat(request: HTTPRequest) -> Response:
        body = json_object(await read_json(request, config.max_body))
        model = find_model(backend, body.get("model"))
        messages = json.dumps(_messages(body.get("messages")))
        inputs: dict[str, Value] = {"messages": messages}
        return await _generate(backend, request, body, model, inputs, chat=True)

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]


def _model_entry(described: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": described["name"],
        "object": "model",
        "created": 0,
        "owned_by": "swarm",
        "task": described.get("task"),
    }


def _vector(row: np.ndarray[Any, Any], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(row.tobytes()).decode()
    return [float(v) for v in row]


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise HTTPFailure(400, "'messages' must be a non-empty list", "invalid_input")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HTTPFailure(400, f"messages[{i}] needs a 'role'", "invalid_input")
        content = message.get("content")
        calls = message.get("tool_calls")
        if content is None:
            content = None if calls else ""  # an assistant turn of tool calls has no text
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    message = f"messages[{i}]: only text content parts are supported"
                    raise HTTPFailure(400, message, "invalid_input")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif not isinstance(content, str):
            raise HTTPFailure(400, f"messages[{i}].content must be text", "invalid_input")
        turn: dict[str, Any] = {"role": message["role"], "content": content}
        # Tool turns pass as they are; the backend's runner checks them (openai_tools).
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key) is not None:
                turn[key] = message[key]
        out.append(turn)
    return out


def sampling_params(body: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Param]:
    """The body's sampling fields as the params the model's runner takes."""
    refuse([k for k in UNSUPPORTED if body.get(k) not in (None, False, [], "none")])
    tools = tool_params(model, body.get("tools"), body.get("tool_choice"))
    sampling = Sampling(
        max_tokens=limit(body, "max_completion_tokens", "max_tokens") or limit(body, "max_tokens"),
        temperature=number(body, "temperature"),
        top_p=number(body, "top_p"),
        top_k=integer(body, "top_k"),
        seed=integer(body, "seed"),
        stop=strings(body, "stop"),
    )
    return params(model, sampling, tools)


async def _generate(
    backend: Backend,
    http: HTTPRequest,
    body: Mapping[str, Any],
    model: Mapping[str, Any],
    inputs: dict[str, Value],
    *,
    chat: bool,
) -> Response:
    how = options(http)
    params = sampling_params(body, model)
    n = _choices(body)
    verify = verify_field(body, how.verify)
    if model.get("task") == "fake":
        inputs = {"text": next(iter(inputs.values()))}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPFailure(400, "'stream' must be true or false", "invalid_input")
    name = str(model["name"])
    prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    ident, created = new_id(prefix), int(time.time())
    # n choices are n swarm jobs, run at once: the router may spread them over peers.
    jobs = [
        Request(
            id=ident if n == 1 else f"{ident}-{i}",
            model=name,
            inputs=inputs,
            params=params,
            stream=stream,
            deadline_ms=how.deadline_ms,
            priority=how.priority,
            hedge_ms=how.hedge_ms,
            verify=verify,
        )
        for i in range(n)
    ]
    if not stream:
        results = await while_connected(http, lambda: execute_all(backend, jobs, _ignore))
        choices = []
        for i, result in enumerate(results):
            text = first(result.outputs.get("text"), "")
            finish = first(result.outputs.get("finish_reason"), "stop")
            choice: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = _reply(text, result.outputs.get("tool_calls"))
            else:
                choice["text"] = text
            choices.append(choice)
        return JSONResponse(
            {
                "id": ident,
                "object": kind,
                "created": created,
                "model": name,
                "choices": choices,
                "usage": _usage([r.outputs for r in results]),
            },
            headers=verify_headers([r.meta for r in results]),
        )
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    object_kind = f"{kind}.chunk" if chat else kind
    head = {"id": ident, "object": object_kind, "created": created, "model": name}

    def chunk(index: int, piece: str | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {} if piece is None else {"role": "assistant", "content": piece}
        else:
            choice["text"] = piece or ""
        return {**head, "choices": [choice]}

    def tool_chunk(index: int, calls: str) -> dict[str, Any]:
        indexed = [{"index": k, **call} for k, call in enumerate(tool_calls(calls))]
        delta = {"role": "assistant", "content": None, "tool_calls": indexed}
        choice = {"index": index, "finish_reason": None, "logprobs": None, "delta": delta}
        return {**head, "choices": [choice]}

    async def produce(write: Write) -> None:
        last: list[dict[str, Value]] = [{} for _ in range(n)]
        one_at_a_time = trio.Lock()  # n jobs stream at once; their SSE events must not interleave

        async def emit(i: int, outputs: Mapping[str, Value]) -> None:
            piece, calls = outputs.get("text"), outputs.get("tool_calls")
            if isinstance(piece, str) and piece:
                async with one_at_a_time:
                    await write(chunk(i, piece, None))
            if chat and isinstance(calls, str):  # complete calls, in one delta
                async with one_at_a_time:
                    await write(tool_chunk(i, calls))
            last[i].update({k: v for k, v in outputs.items() if k != "text"})

        await execute_all(backend, jobs, emit)
        for i in range(n):
            await write(chunk(i, None, first(last[i].get("finish_reason"), "stop")))
        if include_usage:
            await write({**head, "choices": [], "usage": _usage(last)})

    return EventStream(produce)


async def _ignore(index: int, outputs: Mapping[str, Value]) -> None:
    """Choices that do not stream emit nothing."""


def _reply(text: str, calls: Value | None) -> dict[str, Any]:
    """A chat answer's message: its text, or the tool calls it made (content null)."""
    if not isinstance(calls, str):
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": tool_calls(calls)}


def _choices(body: Mapping[str, Any]) -> int:
    """``n``: how many choices to generate (1 to MAX_CHOICES)."""
    n = body.get("n", 1)
    if n is None:
        return 1
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise HTTPFailure(400, f"'n' must be an integer from 1 to {MAX_CHOICES}", "invalid_input")
    return n


def _usage(each: Sequence[Mapping[str, Value]]) -> dict[str, int]:
    """Token counts over the choices: the prompt is counted once, completions summed."""
    p = count(each[0], "prompt_tokens") if each else 0
    c = sum(count(outputs, "completion_tokens") for outputs in each)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
