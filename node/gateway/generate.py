"""What the gateway's model APIs share: a swarm job from a conversation, and its answer.

OpenAI's chat and completions, the Responses API, Anthropic's Messages and
Ollama's chat and generate each read their own body in their own names; what
they ask of a model is the same few things, and those meet here:

- ``Sampling``: the limit on new tokens and the sampling fields; ``params``
  turns it into the params the model's runner takes: ``max_tokens`` for
  OpenAI-compatible backends, else ``max_new_tokens`` (generation runners);
  ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` and
  ``repetition_penalty`` as they are. Models of task ``fake`` (swarm's
  stand-in, runners/fake.py) take no params. The gateway checks types; each
  runner checks ranges, and its refusal is a 400 naming the param.
- tools in OpenAI chat's shape (``tool_params``), for models served by an
  OpenAI-compatible backend only: every other model refuses them by name.
- ``job``: the conversation (OpenAI chat's list of turns) or a prompt as one
  swarm ``Request`` (a fake model takes either as its ``text``), with the
  swarm's deadline and priority headers.
- ``Answer``: what a finished job said: its text, why it stopped, the tool
  calls it made (whole) and the token counts the model reported (0 where it
  reported none). ``complete`` runs a job while its client waits; ``stream``
  hands each piece of text to ``on_text`` as it comes, and ``produce`` writes
  a streamed job as an API's ``Frames`` (its events or lines, built by a
  pure object of that API's module).
- ``embed``: texts as one embedding job, its vectors and the input tokens
  the embedder counted (OpenAI's embeddings, Ollama's embed).

Errors: ``HTTPFailure`` 400 naming the field in the API's own words, or the
swarm's ``SwarmError`` of the job.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from starlette.requests import Request as HTTPRequest

from protocols import Param, Request, Scalar, Tensor, Value
from runners.remote.openai_compat import RUNNER as OPENAI_RUNNER  # takes max_tokens, tools

from .app import Backend, new_id, options, run_while_connected
from .errors import HTTPFailure
from .sse import Produce, Write

GENERATION_TASKS = frozenset({"text-generation", "fake"})
EMBEDDING_TASKS = frozenset({"embeddings", "fake"})
OnText = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Sampling:
    """What a request says about how to sample; None: the runner's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None


def number(body: Mapping[str, Any], key: str, name: str | None = None) -> float | None:
    """``body[key]`` as a float, None if absent; 400 naming ``name`` if not a number."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise HTTPFailure(400, f"'{name or key}' must be a number", "invalid_input")
    return float(value)


def integer(body: Mapping[str, Any], key: str, name: str | None = None) -> int | None:
    """``body[key]`` as an int, None if absent; 400 naming ``name`` if not an integer."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise HTTPFailure(400, f"'{name or key}' must be an integer", "invalid_input")
    return value


def limit(body: Mapping[str, Any], key: str, name: str | None = None) -> int | None:
    """A limit on new tokens: a positive integer, or None if absent."""
    value = body.get(key)
    if value is not None and (type(value) is not int or value < 1):
        raise HTTPFailure(400, f"'{name or key}' must be a positive integer", "invalid_input")
    return value


def strings(body: Mapping[str, Any], key: str, name: str | None = None) -> tuple[str, ...]:
    """A string or a list of strings (stop sequences), as a tuple."""
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    message = f"'{name or key}' must be a string or a list of strings"
    raise HTTPFailure(400, message, "invalid_input")


def refuse(names: list[str]) -> None:
    """400 naming the fields the request set that this gateway cannot honour."""
    if names:
        message = f"not supported by this gateway: {', '.join(sorted(names))}"
        raise HTTPFailure(400, message, "unsupported_parameter")


def not_text(where: str, kind: str, model: Mapping[str, Any]) -> HTTPFailure:
    """The refusal of content a text model cannot read (an image, a file, audio)."""
    message = (
        f"{where} is {kind}, which {model['name']} cannot read: the gateway sends "
        "generation models text only"
    )
    return HTTPFailure(400, message, "unsupported_content")


def check_task(model: Mapping[str, Any], tasks: frozenset[str], what: str) -> str:
    task = str(model.get("task"))
    if task not in tasks:
        raise HTTPFailure(
            400, f"{model['name']} is a {task} model; {what} needs another", "wrong_model_task"
        )
    return task


def tool_params(
    model: Mapping[str, Any], tools: Any, choice: Any, *, name: str = "tools"
) -> dict[str, Param]:
    """``tools`` and ``tool_choice`` (OpenAI chat's shapes) as the JSON-text params an
    OpenAI-compatible backend's runner takes (it checks them, runners/remote/openai_tools);
    other runners cannot call tools, so they are refused."""
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise HTTPFailure(400, f"'tool_choice' needs '{name}'", "invalid_input")
        return {}
    if model.get("runner") != OPENAI_RUNNER:
        message = (
            f"{model['name']} cannot call tools: tools need a model served by an "
            "OpenAI-compatible backend (vLLM, llama.cpp, ...)"
        )
        raise HTTPFailure(400, message, "unsupported_parameter")
    if not isinstance(tools, list):
        raise HTTPFailure(400, f"'{name}' must be a list", "invalid_input")
    params: dict[str, Param] = {"tools": json.dumps(tools)}
    if choice is not None:
        params["tool_choice"] = choice if isinstance(choice, str) else json.dumps(choice)
    return params


def params(
    model: Mapping[str, Any], sampling: Sampling, tools: Mapping[str, Param] | None = None
) -> dict[str, Param]:
    """The params the model's runner takes for ``sampling`` and ``tools`` (see the module)."""
    if check_task(model, GENERATION_TASKS, "text generation") == "fake":
        return {}
    out: dict[str, Param] = dict(tools or {})
    if sampling.max_tokens is not None:
        key = "max_tokens" if model.get("runner") == OPENAI_RUNNER else "max_new_tokens"
        out[key] = sampling.max_tokens
    for key in ("temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        value = getattr(sampling, key)
        if value is not None:
            out[key] = value
    if sampling.stop:
        out["stop"] = list(sampling.stop)
    return out


def job(
    ident: str,
    http: HTTPRequest,
    model: Mapping[str, Any],
    *,
    messages: list[dict[str, Any]] | None = None,
    prompt: str | None = None,
    params: Mapping[str, Param],
    stream: bool,
) -> Request:
    """One swarm job for the conversation ``messages`` (OpenAI chat's turns) or ``prompt``."""
    text = prompt if messages is None else json.dumps(messages)
    if text is None:
        raise HTTPFailure(400, "give a conversation or a prompt", "invalid_input")
    if model.get("task") == "fake":
        inputs: dict[str, Value] = {"text": text}
    else:
        inputs = {"prompt": text} if messages is None else {"messages": text}
    how = options(http)
    return Request(
        id=ident,
        model=str(model["name"]),
        inputs=inputs,
        params=dict(params),
        stream=stream,
        deadline_ms=how.deadline_ms,
        priority=how.priority,
        hedge_ms=how.hedge_ms,
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """What a finished generation job said (see the module)."""

    text: str
    finish_reason: str = "stop"  # stop, length or tool_calls, as the runner said
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI chat's shape
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, outputs: Mapping[str, Value], text: str | None = None) -> Answer:
        """From a job's outputs (a stream's last chunk, with ``text`` put together)."""
        calls = outputs.get("tool_calls")
        return cls(
            text=first(outputs.get("text"), "") if text is None else text,
            finish_reason=first(outputs.get("finish_reason"), "stop"),
            tool_calls=tool_calls(calls) if isinstance(calls, str) else [],
            prompt_tokens=count(outputs, "prompt_tokens"),
            completion_tokens=count(outputs, "completion_tokens"),
        )

    @property
    def truncated(self) -> bool:
        """It stopped at the token limit (or the context's end)."""
        return self.finish_reason == "length"


async def complete(backend: Backend, http: HTTPRequest, request: Request) -> Answer:
    """Run ``request`` while its client waits; its answer."""
    return Answer.of((await run_while_connected(backend, http, request)).outputs)


async def stream(backend: Backend, request: Request, on_text: OnText) -> Answer:
    """Run ``request`` streamed, each piece of text to ``on_text`` as it comes; the
    answer once it ends (its text all the pieces)."""
    pieces: list[str] = []
    last: dict[str, Value] = {}

    async def emit(outputs: Mapping[str, Value]) -> None:
        piece = outputs.get("text")
        if isinstance(piece, str) and piece:
            pieces.append(piece)
            await on_text(piece)
        last.update({k: v for k, v in outputs.items() if k != "text"})

    await backend.execute(request, emit)
    return Answer.of(last, text="".join(pieces))


def wants_stream(body: Mapping[str, Any], *, default: bool = False) -> bool:
    """``stream``: true or false (absent or null: ``default``)."""
    wanted = body.get("stream")
    if wanted is None:
        return default
    if not isinstance(wanted, bool):
        raise HTTPFailure(400, "'stream' must be true or false", "invalid_input")
    return wanted


class Frames(Protocol):
    """An API's frames for one streamed answer (pure: each call returns frames to write)."""

    def text(self, piece: str) -> list[dict[str, Any]]:
        """The frames for one more piece of text."""

    def end(self, answer: Answer) -> list[dict[str, Any]]:
        """The frames after the last piece."""


def produce(backend: Backend, request: Request, frames: Frames) -> Produce:
    """What a streamed answer runs: ``request``, its text written as ``frames`` say."""

    async def run(write: Write) -> None:
        async def on_text(piece: str) -> None:
            for each in frames.text(piece):
                await write(each)

        answer = await stream(backend, request, on_text)
        for each in frames.end(answer):
            await write(each)

    return run


def first(value: Value | None, default: str) -> str:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else default


def count(outputs: Mapping[str, Value], key: str) -> int:
    value = outputs.get(key)
    return value if type(value) is int else 0


def tool_calls(text: str) -> list[Any]:
    """The ``tool_calls`` output (JSON text, checked by the runner that made it)."""
    try:
        calls = json.loads(text)
    except ValueError as exc:
        raise HTTPFailure(502, f"the model's tool_calls are not JSON: {exc}", "bad_output") from exc
    if not isinstance(calls, list):
        raise HTTPFailure(502, "the model's tool_calls are not a list", "bad_output")
    return calls


def arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call's arguments (JSON text in OpenAI's shape) as the object they encode,
    as Anthropic's ``input`` and Ollama's ``arguments`` carry them."""
    text = call.get("function", {}).get("arguments", "")
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        message = f"a tool call's arguments are not JSON: {exc}"
        raise HTTPFailure(502, message, "bad_output") from exc
    if not isinstance(value, dict):
        raise HTTPFailure(502, "a tool call's arguments are not a JSON object", "bad_output")
    return value


def input_texts(body: Mapping[str, Any], key: str) -> list[str]:
    """What to embed: a string or a non-empty list of strings."""
    texts = body.get(key)
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise HTTPFailure(400, f"'{key}' must be a string or a list of strings", "invalid_input")
    return texts


async def embed(
    backend: Backend, http: HTTPRequest, model: Mapping[str, Any], texts: list[str]
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int]:
    """``texts`` embedded by ``model`` in one job: the rows (float32 [n, d]) and the
    input tokens it counted."""
    rows, tokens, _ = await embedded(backend, http, model, texts)
    return rows, tokens


async def embedded(
    backend: Backend,
    http: HTTPRequest,
    model: Mapping[str, Any],
    texts: list[str],
    *,
    verify: int = 0,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int, Mapping[str, Scalar]]:
    """``embed``, run on ``verify`` more nodes, with the result's meta (how they compared)."""
    check_task(model, EMBEDDING_TASKS, "embeddings")
    how = options(http)
    request = Request(
        id=new_id("emb"),
        model=str(model["name"]),
        inputs={"text": texts},
        deadline_ms=how.deadline_ms,
        priority=how.priority,
        hedge_ms=how.hedge_ms,
        verify=verify,
    )
    result = await run_while_connected(backend, http, request)
    vectors = result.outputs.get("embedding")
    if not isinstance(vectors, Tensor) or len(vectors.shape) != 2:
        raise HTTPFailure(500, f"{model['name']} gave no 'embedding' [n, d]", "bad_output")
    return vectors.numpy().astype("<f4"), token_count(result.outputs), result.meta


def token_count(outputs: Mapping[str, Value]) -> int:
    """Input tokens an embedder reported: ``tokens`` per row, or a ``prompt_tokens``
    total; 0 when it counted none (a backend that does not say)."""
    per_row = outputs.get("tokens")
    if isinstance(per_row, Tensor) and per_row.dtype.startswith(("int", "uint")):
        return int(per_row.numpy().sum())
    return count(outputs, "prompt_tokens")
