"""A fake runner, for tests and benchmarks of the swarm itself, not for users.

It does no real work: it waits a fixed latency (``trio.sleep``, never a
thread) and answers with outputs derived deterministically from its inputs, so
a test can tell which request an answer belongs to and a benchmark measures
the swarm, not a model. It costs a few microseconds per request.

Inputs: ``text`` (a string or a list of strings) or ``x`` (float32 [batch, ?]),
exactly one of them. Outputs of ``infer``:

- ``embedding``: float32 [n, dim]. For text, row i is a function of text i alone
  (shake-256 of its UTF-8, scaled to [-0.5, 0.5)); for ``x``, ``2 * sum(x[i])``
  repeated ``dim`` times.
- ``text``: the concatenation of what ``stream`` yields.

``stream`` yields ``chunks`` chunks of ``{"text": "<word> "}``, the latency
split evenly between them, like a text generator.

Params: ``chunks`` (int, 1 to MAX_CHUNKS, default 3) and ``fail`` (an
``ErrorCode`` name such as ``"OVERLOADED"``): the runner then raises an error
carrying that code before doing anything, so a test can make a peer fail on
demand. It is raised when the request runs (``infer`` or ``stream``), not by
``check``: the node has admitted the request by then, as it would have
admitted work that fails for real.

Continuation (``runners.continuation``), unless built with ``continues=False``:
with ``continue_from`` the fake counts its words (one word, one token, one
chunk) and goes on from the next, so a stream resumed after k chunks yields
words k..chunks-1, what the uninterrupted one would have. ``stall_rate`` of
its jobs (drawn from a seeded rng) first wait ``stall_s`` more, like a peer
that stalls now and then; ``started``, ``finished`` and ``cancelled`` count its
runs, so a test can see a job cancelled on the node that ran it.

``LyingFakeRunner`` is the same fake with a flaw, for the tests and benchmarks
of verification: a share ``lie_rate`` of its answers (drawn from a seeded rng)
carry well-formed but wrong embeddings, rows of another text with the right
shape, dtype and scale, and the rest are the honest fake's.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from protocols import ErrorCode, Param, Tensor, Value
from protocols.errors import ConfigError

from . import continuation
from .base import (
    TEXT,
    ModelInfo,
    Outputs,
    OutputSpec,
    Runner,
    TensorSpec,
    TextSpec,
    check_inputs,
)
from .continuation import CONTINUES
from .errors import BadInput, ModelNotFound, RunnerError

MAX_CHUNKS = 1024
MAX_ITEMS = 256
MAX_CHARS = 65536
DEFAULT_CHUNKS = 3
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


class FakeFailure(RunnerError):
    """What ``fail=CODE`` raises for codes without a runner error of their own."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class FakeConfig:
    """A fake model table: ``name``, ``latency_ms``, ``continues`` (default true),
    ``stall_rate`` (0 to 1), ``stall_ms`` and ``seed`` (of the stall draws)."""

    name: str
    latency_ms: float = 0.0
    continues: bool = True
    stall_rate: float = 0.0
    stall_ms: float = 0.0
    seed: int = 0

    def build(self) -> FakeRunner:
        return FakeRunner(
            self.name,
            latency_s=self.latency_ms / 1000,
            continues=self.continues,
            stall_rate=self.stall_rate,
            stall_s=self.stall_ms / 1000,
            seed=self.seed,
        )


class FakeRunner(Runner):
    """A fake model named ``name``: fixed latency, deterministic outputs (see the module)."""

    def __init__(
        self,
        name: str,
        latency_s: float = 0.0,
        dim: int = 8,
        *,
        concurrency: int = 1,
        continues: bool = True,
        stall_rate: float = 0.0,
        stall_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not latency_s >= 0 or not stall_s >= 0:
            raise ConfigError("latency_s and stall_s must be non-negative")
        if dim < 1 or concurrency < 1:
            raise ConfigError("dim and concurrency must be at least 1")
        if not 0.0 <= stall_rate <= 1.0:
            raise ConfigError("stall_rate must be from 0 to 1")
        self.latency_s = float(latency_s)
        self.dim = dim
        self.continues = continues
        self.stall_rate = stall_rate
        self.stall_s = float(stall_s)
        self._stalls = random.Random(seed)
        self.started = self.finished = self.cancelled = self.stalled = 0
        # One at a time by default, like a model with one compute slot, so a fake peer
        # queues and saturates the way a real one does; raise it for throughput benchmarks.
        self.concurrency = concurrency
        self.info = ModelInfo(
            name=name,
            task="fake",
            runner="fake",
            device="none",
            precision="fp32",
            max_batch=MAX_ITEMS,
            inputs=(
                TextSpec("text", max_items=MAX_ITEMS, max_chars=MAX_CHARS, required=False),
                TensorSpec("x", frozenset({"float32"}), (None, None), required=False),
            ),
            outputs=(
                OutputSpec("embedding", "float32", (None, dim)),
                OutputSpec("text", TEXT, (1,)),
            ),
            streams=True,
            extra={
                "dim": dim,
                "latency_ms": self.latency_s * 1000,
                **({CONTINUES: "text"} if continues else {}),
            },
        )

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self._validate(inputs, params)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        first, chunks = self._start(inputs, params)
        with self._counted():
            await self._stall()
            if self.latency_s:  # zero latency means no wait at all, not a yield to the scheduler
                await trio.sleep(self.latency_s)
            words = "".join(_word(inputs, i) for i in range(first, chunks))
            return {"embedding": self._embedding(inputs), "text": words}

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        first, chunks = self._start(inputs, params)
        pause = self.latency_s / chunks
        with self._counted():
            await self._stall()
            for i in range(first, chunks):
                await trio.sleep(pause)
                yield {"text": _word(inputs, i)}

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self.started += 1
        try:
            yield
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.finished += 1

    async def _stall(self) -> None:
        if self.stall_rate and self._stalls.random() < self.stall_rate:
            self.stalled += 1
            await trio.sleep(self.stall_s)

    def _validate(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> tuple[int, int, ErrorCode | None]:
        """(the first word's index, the chunk count, the failure asked for)."""
        resumed, rest = continuation.split(self.info.name, params)
        if resumed is not None and not self.continues:
            raise BadInput(f"{self.info.name}: this fake does not continue answers")
        chunks, fail = _parse_params(self.info.name, rest)
        check_inputs(self.info, inputs)
        if (inputs.get("text") is None) == (inputs.get("x") is None):
            raise BadInput(f"{self.info.name}: give exactly one of 'text' or 'x'")
        first = 0 if resumed is None else min(len(resumed.text.split()), chunks)
        return first, chunks, fail

    def _start(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> tuple[int, int]:
        """Check the request, raise the error asked for; the words to say, as a range."""
        first, chunks, fail = self._validate(inputs, params)
        if fail is not None:
            raise _failure(fail, f"{self.info.name}: failing on request with {fail}")
        return first, chunks

    def _embedding(self, inputs: Mapping[str, Value]) -> Tensor:
        text = inputs.get("text")
        if isinstance(text, str | list):
            texts = [text] if isinstance(text, str) else text
            return Tensor.from_numpy(np.stack([_text_row(t, self.dim) for t in texts]))
        x = inputs.get("x")
        if not isinstance(x, Tensor):  # check() already refused this; keeps the types honest
            raise BadInput(f"{self.info.name}: give exactly one of 'text' or 'x'")
        sums = x.numpy().sum(axis=1, dtype=np.float32) * np.float32(2)
        return Tensor.from_numpy(np.repeat(sums[:, None], self.dim, axis=1))


class LyingFakeRunner(FakeRunner):
    """A fake that answers ``lie_rate`` of its jobs with wrong embeddings (see the module)."""

    def __init__(
        self,
        name: str,
        lie_rate: float = 1.0,
        *,
        seed: int = 0,
        latency_s: float = 0.0,
        dim: int = 8,
        concurrency: int = 1,
    ) -> None:
        if not 0.0 <= lie_rate <= 1.0:
            raise ConfigError("lie_rate must be from 0 to 1")
        super().__init__(name, latency_s, dim, concurrency=concurrency)
        self.lie_rate = lie_rate
        self.lies = 0  # answers it lied in, for the test to compare with what was caught
        self.answers = 0
        self._rng = random.Random(seed)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        outputs = await super().infer(inputs, params)
        self.answers += 1
        if self._rng.random() >= self.lie_rate:
            return outputs
        self.lies += 1
        text = inputs.get("text")
        if isinstance(text, str | list):
            texts = [text] if isinstance(text, str) else text
            rows = [_text_row("a lie about " + t, self.dim) for t in texts]
            return {**outputs, "embedding": Tensor.from_numpy(np.stack(rows))}
        honest = outputs["embedding"]
        if not isinstance(honest, Tensor):  # never: the honest fake's own output
            return outputs
        return {**outputs, "embedding": Tensor.from_numpy(-honest.numpy() - 1)}


def _parse_params(model: str, params: Mapping[str, Param]) -> tuple[int, ErrorCode | None]:
    unknown = set(params) - {"chunks", "fail"}
    if unknown:
        raise BadInput(
            f"{model}: unknown params {sorted(unknown)}; it takes 'chunks', 'fail', "
            f"{continuation.CONTINUE_FROM!r} and {continuation.CONTINUE_TOKENS!r}"
        )
    chunks = params.get("chunks", DEFAULT_CHUNKS)
    if type(chunks) is not int or not 1 <= chunks <= MAX_CHUNKS:
        raise BadInput(f"{model}: param 'chunks' must be an int from 1 to {MAX_CHUNKS}")
    fail = params.get("fail")
    if fail is None:
        return chunks, None
    if not isinstance(fail, str) or fail not in ErrorCode.__members__:
        raise BadInput(f"{model}: param 'fail' must be one of {sorted(ErrorCode.__members__)}")
    return chunks, ErrorCode[fail]


def _failure(code: ErrorCode, message: str) -> RunnerError:
    if code is ErrorCode.BAD_REQUEST:
        return BadInput(message)
    if code is ErrorCode.MODEL_NOT_FOUND:
        return ModelNotFound(message)
    if code is ErrorCode.INTERNAL:
        return RunnerError(message)
    return FakeFailure(code, message)


def _text_row(text: str, dim: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    raw = np.frombuffer(hashlib.shake_256(text.encode()).digest(dim), dtype=np.uint8)
    return raw.astype(np.float32) / np.float32(256) - np.float32(0.5)


def _word(inputs: Mapping[str, Value], i: int) -> str:
    """The i-th streamed word: the same inputs always give the same words."""
    text = inputs.get("text")
    seed = len(text) if isinstance(text, str | list) else 0
    return WORDS[(seed + i) % len(WORDS)] + " "
