"""Text generation requests, shared by every local text-generation runner.

One request shape, whatever runs it (OpenVINO GenAI or torch):

Inputs, exactly one of:

- ``prompt``: one string, continued as it is (no chat template).
- ``messages``: one string holding a JSON list of chat messages,
  ``[{"role": "system"|"user"|"assistant", "content": "..."}, ...]`` (the
  OpenAI chat shape); the model's chat template renders it, with the prompt
  for the assistant's answer appended.

Params (all optional; anything else is refused):

- ``max_new_tokens`` int, 1 to the runner's limit (default ``DEFAULT_NEW_TOKENS``
  or the limit, whichever is smaller). Generation also stops where the
  context ends; the finish reason is then "length".
- ``temperature`` float, 0 to 2 (default 0: greedy, deterministic).
- ``top_p`` float in (0, 1] (default 1), ``top_k`` int, 0 (off) to 1000.
- ``seed`` int, 0 to 2**63 - 1: with sampling, the same seed gives the same text.
- ``stop`` a string or a list of up to 4 strings (1 to 64 chars): generation
  ends before the first of them, which is left out of the text.
- ``repetition_penalty`` float, 0.5 to 2 (default 1: off).

Continuation (``runners.continuation``): ``continue_from`` and
``continue_tokens`` continue an answer from its start, for the node that resumes
a stream whose producer died. A chat continues the assistant's turn (the
template rendered with the prompt for the answer, then the text); a raw prompt
continues the prompt and the text. The budget is ``max_new_tokens`` less
``continue_tokens``, and the counts are the whole answer's.

Outputs of ``infer``: ``text`` (str), ``prompt_tokens`` and
``completion_tokens`` (int), ``finish_reason`` ("stop": end of turn or a stop
string; "length": ``max_new_tokens`` or the context ran out). ``stream``
yields ``{"text": piece, "tokens": n}`` as tokens come (``n``: the generated
tokens whose text the piece completes, so the counts of the pieces a client got
sum to the tokens of its text), then one last chunk with ``text`` "" and the
other three outputs.

A runner supplies an ``Engine`` (blocking: tokenizer, template, model); the
``GenerationRunner`` here parses, serializes access to the engine, and moves
the work to a thread (``token_stream``) so the trio thread never blocks.
"""

from __future__ import annotations

import abc
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import trio

from protocols import Param, Value, bounded_json

from . import continuation
from .base import TEXT, ModelInfo, Outputs, OutputSpec, Runner, TextSpec, check_inputs
from .continuation import Continuation
from .errors import BadInput, RunnerError
from .token_stream import Done, pieces, run_cancellable

TASK = "text-generation"
MAX_CHARS = 65536  # of ``prompt`` or of the ``messages`` JSON
MAX_MESSAGES = 256
ROLES = frozenset({"system", "user", "assistant"})
DEFAULT_NEW_TOKENS = 256
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1
MAX_TOP_K = 1000
STREAM_BUFFER = 16  # pieces waiting for the reader before the generator blocks
PARAMS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"}
)
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
CONTINUED = "prompt messages"  # ModelInfo.extra["continues"] of these runners
_T = TypeVar("_T")


def input_specs() -> tuple[TextSpec, TextSpec]:
    return (
        TextSpec("prompt", max_items=1, max_chars=MAX_CHARS, required=False),
        TextSpec("messages", max_items=1, max_chars=MAX_CHARS, required=False),
    )


# What ``infer`` answers (see the module); ``stream``'s chunks carry some of them.
OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("text", TEXT, (1,)),
    OutputSpec("prompt_tokens", "int64", (1,)),
    OutputSpec("completion_tokens", "int64", (1,)),
    OutputSpec("finish_reason", TEXT, (1,)),
    OutputSpec("tokens", "int64", (1,)),  # of a streamed piece (see the module)
)


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """Raw text to continue, or chat messages for the model's template: one is set."""

    text: str | None = None
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class Sampling:
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class Request:
    prompt: Prompt
    sampling: Sampling
    continuation: Continuation | None = None  # the answer's start, to continue from

    @property
    def spent(self) -> int:
        """Tokens of the answer generated before this run (0 unless it continues)."""
        return 0 if self.continuation is None else self.continuation.tokens

    def budget(self, model: str, input_tokens: int, context_length: int) -> int:
        """New tokens this run may make: the request's limit less what was spent, and
        what the context holds after the input (the prompt and any continuation).
        0 for a continuation with nothing left (its answer ends "length"); BadInput
        when a prompt of its own leaves no room."""
        room = context_length - input_tokens
        allowed = self.sampling.max_new_tokens - self.spent
        if self.continuation is not None:
            return max(0, min(allowed, room))
        if room < 1:
            raise context_error(model, input_tokens, context_length)
        return min(allowed, room)

    def spent_answer(self, prompt_tokens: int) -> Completion:
        """The answer of a continuation with no budget left: nothing more, "length"."""
        return Completion("", prompt_tokens, self.spent, FINISH_LENGTH)

    def input_text(self, rendered: str) -> str:
        """What the model reads: the rendered prompt, then the answer's start if any."""
        return rendered if self.continuation is None else rendered + self.continuation.text


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def outputs(self) -> Outputs:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }


def parse_request(
    info: ModelInfo, inputs: Mapping[str, Value], params: Mapping[str, Param], limit: int
) -> Request:
    """Check inputs and params; raise BadInput naming the first thing wrong."""
    resumed, rest = continuation.split(info.name, params, MAX_CHARS)
    return Request(parse_prompt(info, inputs), parse_sampling(info.name, rest, limit), resumed)


def parse_prompt(info: ModelInfo, inputs: Mapping[str, Value]) -> Prompt:
    check_inputs(info, inputs)
    model = info.name
    text, chat = _one_string(model, inputs, "prompt"), _one_string(model, inputs, "messages")
    if (text is None) == (chat is None):
        raise BadInput(f"{model}: give exactly one of 'prompt' or 'messages'")
    if text is not None:
        if not text:
            raise BadInput(f"{model}: input 'prompt' is empty")
        return Prompt(text=text)
    assert chat is not None
    return Prompt(messages=_parse_messages(model, chat))


def _one_string(model: str, inputs: Mapping[str, Value], name: str) -> str | None:
    value = inputs.get(name)
    if isinstance(value, list):  # check_inputs let through a list of one
        value = value[0]
    if value is not None and not isinstance(value, str):
        raise BadInput(f"{model}: input {name!r} must be a string")
    return value


def _parse_messages(model: str, blob: str) -> tuple[Message, ...]:
    try:
        items = bounded_json.loads(blob)
    except bounded_json.BadJSON as exc:
        raise BadInput(f"{model}: input 'messages' is {exc}") from None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_MESSAGES:
        raise BadInput(f"{model}: input 'messages' must be a JSON list of 1 to {MAX_MESSAGES}")
    messages = []
    for i, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or set(item) != {"role", "content"}
            or item["role"] not in ROLES
            or not isinstance(item["content"], str)
        ):
            raise BadInput(
                f"{model}: messages[{i}] must be {{'role': one of {sorted(ROLES)}, "
                f"'content': a string}}"
            )
        messages.append(Message(item["role"], item["content"]))
    return tuple(messages)


def parse_sampling(model: str, params: Mapping[str, Param], limit: int) -> Sampling:
    unknown = set(params) - PARAMS
    if unknown:
        takes = sorted(PARAMS | continuation.PARAMS)
        raise BadInput(f"{model}: unknown params {sorted(unknown)}; it takes {takes}")
    return Sampling(
        max_new_tokens=_int(
            model, params, "max_new_tokens", min(DEFAULT_NEW_TOKENS, limit), 1, limit
        ),
        temperature=_float(model, params, "temperature", 0.0, 0.0, 2.0),
        top_p=_float(model, params, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=_int(model, params, "top_k", 0, 0, MAX_TOP_K),
        seed=None if params.get("seed") is None else _int(model, params, "seed", 0, 0, MAX_SEED),
        stop=_stops(model, params.get("stop")),
        repetition_penalty=_float(model, params, "repetition_penalty", 1.0, 0.5, 2.0),
    )


def _int(
    model: str, params: Mapping[str, Param], name: str, default: int, low: int, high: int
) -> int:
    value = params.get(name)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise BadInput(f"{model}: param {name!r} must be an int from {low} to {high}")
    return value


def _float(
    model: str,
    params: Mapping[str, Param],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
) -> float:
    value = params.get(name)
    if value is None:
        return default
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    number = float(value) if numeric else None  # type: ignore[arg-type]
    if number is None or not (low < number if open_low else low <= number) or number > high:
        bracket = "(" if open_low else "["
        raise BadInput(f"{model}: param {name!r} must be a number in {bracket}{low:g}, {high:g}]")
    return number


def _stops(model: str, value: Param) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or not 1 <= len(items) <= MAX_STOPS
        or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in items)
    ):
        raise BadInput(
            f"{model}: param 'stop' must be a string or a list of 1 to {MAX_STOPS} strings "
            f"of 1 to {MAX_STOP_CHARS} characters"
        )
    return tuple(items)


def context_error(model: str, prompt_tokens: int, context_length: int) -> BadInput:
    return BadInput(
        f"{model}: the prompt has {prompt_tokens} tokens; the context holds {context_length}, "
        "and at least one must be left to generate"
    )


class StopScanner:
    """Cut streamed text before the first stop string, holding back what may start one.

    ``feed`` returns the text that is safe to show now; ``stopped`` turns True once a
    stop string appeared (the caller then ends generation); ``flush`` returns what
    was held back when generation ended without one.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            self._held = ""
            return text[: min(cuts)]
        keep = self._partial(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best


@dataclass(frozen=True, slots=True)
class Piece:
    """Generated text, and how many generated tokens it completes (a token's text may
    come with a later piece: an unfinished character, a held-back stop string)."""

    text: str
    tokens: int


Emit = Callable[[Piece], bool]


class TokenText:
    """Token ids into text as it becomes final, with the tokens each piece completes.

    ``decode`` is the tokenizer's (special tokens skipped). Text is decoded over a
    window of ids that starts afresh after each newline, and shown only once
    ``delay`` more tokens have come (a detokenizer may change the end of a text as
    tokens follow; OpenVINO GenAI's own text streamer waits 3), never while it ends
    in an unfinished UTF-8 character. Each piece counts the tokens whose text it
    completes: the pieces a client got sum to the tokens of exactly its text, what a
    continuation of that text is charged. Tokens that add no text (an end of turn)
    are never counted.
    """

    def __init__(self, decode: Callable[[list[int]], str], delay: int = 0) -> None:
        self._decode = decode
        self._delay = delay
        self._window: list[int] = []
        self._lengths: list[int] = []  # the window's text length after each id; -1 unfinished
        self._printed = 0  # characters of the window's text shown
        self._counted = 0  # ids of the window counted in pieces

    def add(self, token_id: int) -> Piece | None:
        """One more token; the text it makes final, if any."""
        self._window.append(token_id)
        text = self._decode(self._window)
        unfinished = text.endswith("\ufffd")
        self._lengths.append(-1 if unfinished else len(text))
        if unfinished:
            return None
        if text.endswith("\n") and len(text) > self._printed:
            piece = Piece(text[self._printed :], self._ending() - self._counted)
            self._window, self._lengths, self._printed, self._counted = [], [], 0, 0
            return piece
        if len(self._lengths) <= self._delay:
            return None
        index = len(self._lengths) - 1 - self._delay
        until = self._lengths[index]
        if until <= self._printed:
            return None
        piece = Piece(text[self._printed : until], index + 1 - self._counted)
        self._printed, self._counted = until, index + 1
        return piece

    def flush(self) -> Piece | None:
        """The text held back when generation ends, if any."""
        text = self._decode(self._window) if self._window else ""
        rest = text[self._printed :]
        piece = Piece(rest, self._ending() - self._counted) if rest else None
        self._window, self._lengths, self._printed, self._counted = [], [], 0, 0
        return piece

    def _ending(self) -> int:
        """Ids of the window up to the last that changed its text."""
        n = len(self._lengths)
        while n > self._counted + 1 and self._lengths[n - 1] == self._lengths[n - 2]:
            n -= 1
        return n


class Shown:
    """Tokens of the text shown when some decoded text is held back (``StopScanner``)."""

    def __init__(self) -> None:
        self._ends: deque[tuple[int, int]] = deque()  # (decoded chars, tokens) at each piece
        self._decoded = self._tokens = self._shown = self._reported = 0

    def decoded(self, piece: Piece) -> None:
        self._decoded += len(piece.text)
        self._tokens += piece.tokens
        self._ends.append((self._decoded, self._tokens))

    def show(self, text: str) -> Piece:
        """``text``, shown now after what was shown before, with the tokens it completes."""
        self._shown += len(text)
        complete = self._reported
        while self._ends and self._ends[0][0] <= self._shown:
            complete = self._ends.popleft()[1]
        piece = Piece(text, complete - self._reported)
        self._reported = complete
        return piece


class Engine(abc.ABC):
    """A loaded model with its tokenizer. All methods block; one call at a time."""

    @abc.abstractmethod
    def generate(self, request: Request, emit: Emit) -> Completion:
        """Generate, passing each new piece to ``emit``; stop when it returns False.

        Raise BadInput (before generating) when the prompt does not fit the context.
        A continuation with no budget left answers ``request.spent_answer`` at once.
        """


class GenerationRunner(Runner):
    """Parses requests, runs one generation at a time on an ``Engine`` in a thread."""

    max_new_tokens: int  # the limit of the ``max_new_tokens`` param

    def __init__(self, info: ModelInfo, max_new_tokens: int) -> None:
        self.info = info
        self.max_new_tokens = max_new_tokens
        self.concurrency = 1
        self._engine: Engine | None = None
        # Not a Lock: an abandoned stream is finalized in another task, which releases it.
        self._busy = trio.Semaphore(1)

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        parse_request(self.info, inputs, params, self.max_new_tokens)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        request = parse_request(self.info, inputs, params, self.max_new_tokens)
        engine = self._ready()

        def work(cancel: threading.Event) -> Completion:
            return engine.generate(request, lambda _piece: not cancel.is_set())

        async with self._busy:
            completion = await self._translate(run_cancellable(work))
        return completion.outputs()

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        request = parse_request(self.info, inputs, params, self.max_new_tokens)
        engine = self._ready()
        await self._busy.acquire()
        try:

            def work(emit: Emit) -> Completion:
                return engine.generate(request, emit)

            items = pieces(work, buffer=STREAM_BUFFER)
            async with aclosing(items):
                while True:
                    item = await self._translate(_next(items))
                    if item is None:
                        break
                    if isinstance(item, Done):
                        yield {**item.value.outputs(), "text": ""}
                    elif item.text:
                        yield {"text": item.text, "tokens": item.tokens}
        finally:
            self._busy.release()

    async def close(self) -> None:
        # A generation in a thread holds its own reference and finishes normally.
        self._engine = None

    def _ready(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise RunnerError(f"{self.info.name}: not loaded")
        return engine

    async def _translate(self, step: Awaitable[_T]) -> _T:
        """Await ``step``; foreign errors of the engine become RunnerError."""
        try:
            return await step
        except RunnerError:
            raise
        except Exception as exc:
            raise RunnerError(f"{self.info.name}: generation failed: {exc}") from exc


async def _next(items: AsyncIterator[_T]) -> _T | None:
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        return None
