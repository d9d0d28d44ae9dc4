"""The runner interface: how one model runs on this node.

A runner knows nothing of peers or streams. The node calls ``check`` before it
queues work (so a bad request is refused at once, not after waiting its turn),
then ``infer`` or ``stream`` from a worker task. Blocking work (model loading,
compute) must go to a thread with ``run_blocking``: the trio thread also keeps
every libp2p stream alive, and yamux resets a stream not read for 5 s.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from protocols import DTYPES, Param, SwarmError, Tensor, Value
from protocols.errors import ConfigError
from protocols.tensors import MAX_NDIM

from .errors import BadInput

# Content pulled from peers lies in the models dir's content/<content id>/ (node.content).
CONTENT_DIR = "content"

Outputs = dict[str, Value]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input tensor: allowed dtypes and a shape where None is any size."""

    name: str
    dtypes: frozenset[str]
    shape: tuple[int | None, ...]
    required: bool = True

    def __post_init__(self) -> None:
        if not self.dtypes <= DTYPES:
            raise ConfigError(f"unknown dtypes {sorted(self.dtypes - DTYPES)}")


@dataclass(frozen=True, slots=True)
class TextSpec:
    """An input text: one string or a list of at most ``max_items`` strings."""

    name: str
    max_items: int
    max_chars: int
    required: bool = True


InputSpec = TensorSpec | TextSpec
TEXT = "text"  # OutputSpec.dtype of text outputs


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """An output: a tensor of ``dtype`` whose ``shape`` has None for any size, or
    text (``dtype`` TEXT): a list of strings of that shape. A lone string or
    number is declared as shape (1,), the one-element tensor it travels as in
    KServe v2; a number's dtype is int64, float64 or bool. An output a request
    must ask for (a param) is declared too: it is what the model can give."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.dtype != TEXT and self.dtype not in DTYPES:
            raise ValueError(f"output {self.name!r}: unknown dtype {self.dtype!r}")
        if len(self.shape) > MAX_NDIM or any(d is not None and d < 0 for d in self.shape):
            raise ValueError(f"output {self.name!r}: shape {self.shape} is not sizes or None")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a runner serves, as announced in the node's capability record."""

    name: str
    task: str  # "embeddings", "text-generation", "image-classification", ...
    runner: str  # "openvino", "torch", "fake", ...
    device: str  # "CPU", "GPU.0", "cuda:0", ...
    precision: str  # "fp32", "fp16", "int8", ...
    max_batch: int
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...] = ()
    context_length: int | None = None
    streams: bool = False  # yields more than one chunk when asked to stream
    extra: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Plain data for capability records and ``swarm status``."""
        return {
            "name": self.name,
            "task": self.task,
            "runner": self.runner,
            "device": self.device,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "context_length": self.context_length,
            "streams": self.streams,
            "inputs": [_describe_spec(s) for s in self.inputs],
            "outputs": [_describe_output(o) for o in self.outputs],
            **dict(self.extra),
        }


def _describe_spec(spec: InputSpec) -> dict[str, Any]:
    if isinstance(spec, TensorSpec):
        return {
            "name": spec.name,
            "kind": "tensor",
            "dtypes": sorted(spec.dtypes),
            "shape": [-1 if d is None else d for d in spec.shape],
            "required": spec.required,
        }
    return {
        "name": spec.name,
        "kind": "text",
        "max_items": spec.max_items,
        "max_chars": spec.max_chars,
        "required": spec.required,
    }


def _describe_output(spec: OutputSpec) -> dict[str, Any]:
    shape = [-1 if d is None else d for d in spec.shape]
    if spec.dtype == TEXT:
        return {"name": spec.name, "kind": "text", "shape": shape}
    return {"name": spec.name, "kind": "tensor", "dtype": spec.dtype, "shape": shape}


class Runner(abc.ABC):
    """One model on this node. Subclasses set ``info`` and implement ``infer``."""

    info: ModelInfo
    # How many requests may run at once; more wait in the node's admission queue.
    concurrency: int = 1

    async def load(self) -> None:  # noqa: B027 (optional hook)
        """Prepare the model (convert, compile, warm up). May take seconds.

        A load that fails or is cancelled leaves nothing it started behind (a
        connection, a container, device memory): the runner is as if built anew.
        """

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        """Raise BadInput unless ``inputs`` match the declared specs. Cheap; runs on trio."""
        check_inputs(self.info, inputs)

    @abc.abstractmethod
    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        """The whole answer for one request."""

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        """Partial outputs as they are produced. Default: the whole answer as one chunk."""
        yield await self.infer(inputs, params)

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what ``load`` took. The node closes every runner it built, so this
        must be safe whether ``load`` succeeded, failed, was cancelled midway or never
        ran, and twice; and complete even when called from a cancelled scope (shield
        what must finish)."""

    def files(self) -> tuple[Path, ...]:
        """The files on this node the model is made of, which it may share with peers
        (see node.content); none for a model that is not files here."""
        return ()

    def status(self) -> Mapping[str, Any] | None:
        """Live state worth showing in ``swarm status`` (a backend's circuit breaker,
        batching counters); None when there is nothing beyond ``info``. No secrets."""
        return None


class WrappedRunner(Runner):
    """A runner around ``inner`` (batching, a container): everything goes to ``inner``
    unless the wrapper overrides it; ``extra`` is added to what ``inner`` announces,
    as it announces it now (a runner learns its inputs and outputs when it loads)."""

    def __init__(self, inner: Runner, extra: Mapping[str, str | int | float | bool]) -> None:
        self.inner = inner
        self._extra = dict(extra)
        self.concurrency = inner.concurrency

    @property
    def info(self) -> ModelInfo:  # type: ignore[override]  # read-only: the inner's, with extra
        inner = self.inner.info
        return replace(inner, extra={**inner.extra, **self._extra})

    async def load(self) -> None:
        await self.inner.load()

    def files(self) -> tuple[Path, ...]:
        return self.inner.files()

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self.inner.check(inputs, params)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        return await self.inner.infer(inputs, params)

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        async with opened_stream(self.inner, inputs, params) as chunks:
            async for chunk in chunks:
                yield chunk

    async def close(self) -> None:
        """Close ``inner``, whatever state it is in: a wrapper owns what it wraps."""
        await self.inner.close()

    def status(self) -> Mapping[str, Any] | None:
        return self.inner.status()


@contextlib.asynccontextmanager
async def opened_stream(
    runner: Runner, inputs: Mapping[str, Value], params: Mapping[str, Param]
) -> AsyncIterator[AsyncGenerator[Outputs, None]]:
    """``runner.stream(...)``, closed on leaving the block: a caller that goes away
    stops the generation at once, not when the garbage collector finalises it."""
    chunks = cast("AsyncGenerator[Outputs, None]", runner.stream(inputs, params))
    async with contextlib.aclosing(chunks):
        yield chunks


async def run_blocking(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter) -> T:
    """Run blocking ``fn`` in a worker thread. Cancellation waits for it to finish."""
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


def check_inputs(info: ModelInfo, inputs: Mapping[str, Value]) -> None:
    """Validate ``inputs`` against ``info.inputs``; raise BadInput naming what is wrong."""
    specs = {s.name: s for s in info.inputs}
    unknown = set(inputs) - set(specs)
    if unknown:
        raise BadInput(f"{info.name}: unknown inputs {sorted(unknown)}; it takes {sorted(specs)}")
    for spec in info.inputs:
        value = inputs.get(spec.name)
        if value is None:
            if spec.required:
                raise BadInput(f"{info.name}: missing input {spec.name!r}")
            continue
        if isinstance(spec, TensorSpec):
            _check_tensor(info.name, spec, value)
        else:
            _check_text(info.name, spec, value)


def _check_tensor(model: str, spec: TensorSpec, value: Value) -> None:
    if not isinstance(value, Tensor):
        raise BadInput(f"{model}: input {spec.name!r} must be a tensor")
    if value.dtype not in spec.dtypes:
        raise BadInput(
            f"{model}: input {spec.name!r} has dtype {value.dtype}, "
            f"expected {' or '.join(sorted(spec.dtypes))}"
        )
    want = spec.shape
    if len(value.shape) != len(want) or any(
        w is not None and w != got for w, got in zip(want, value.shape, strict=True)
    ):
        shown = ["?" if w is None else w for w in want]
        raise BadInput(
            f"{model}: input {spec.name!r} has shape {list(value.shape)}, expected {shown}"
        )


def _check_text(model: str, spec: TextSpec, value: Value) -> None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadInput(f"{model}: input {spec.name!r} must be a string or a list of strings")
    if not items or len(items) > spec.max_items:
        raise BadInput(f"{model}: input {spec.name!r} takes 1 to {spec.max_items} strings")
    longest = max(len(s) for s in items)
    if longest > spec.max_chars:
        raise BadInput(
            f"{model}: input {spec.name!r} has a text of {longest} characters, "
            f"at most {spec.max_chars}"
        )


async def gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` at once, answers in order. The first to fail with a SwarmError
    cancels the rest and is raised as itself (not wrapped in an exception group)."""
    if len(calls) == 1:
        return [await calls[0]()]
    results: list[Any] = [None] * len(calls)
    failures: list[SwarmError] = []
    async with trio.open_nursery() as nursery:

        async def run(i: int) -> None:
            try:
                results[i] = await calls[i]()
            except SwarmError as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()

        for i in range(len(calls)):
            nursery.start_soon(run, i)
    if failures:
        raise failures[0]
    return results
