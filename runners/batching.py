"""Dynamic batching: concurrent requests for one model combined into one call.

A model on a CPU or GPU does far more rows per second in one call of 16 than in
16 calls of one. ``BatchingRunner`` wraps any runner whose inputs are row-wise
(texts, or tensors whose first dimension is the batch): requests that arrive
while the model is busy, with the same parameters and row shapes, wait in one
forming batch; when an execution slot frees up (or the batch is full), the
batch is closed, its inputs concatenated, the inner runner called once, and
each output cut back into the rows of each request.

The first request of a batch leads it: it waits for a slot, then up to
``max_wait_ms`` for company (never past a full batch), and runs the call for
everyone. Its own caller giving up must not fail the others, so the leader's
part runs shielded; the call is in a worker thread anyway, which cancellation
would wait for. A follower that gives up before its batch closes leaves it; one
that gives up later has its rows computed and dropped.

An output is cut back when its first dimension (or list length) is a multiple
of the batch's rows; anything else is an error for the whole batch, named as
such. Requests that cannot be batched (no inputs, mixed kinds, streaming) go to
the inner runner as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio
import trio.lowlevel

from protocols import Param, SwarmError, Tensor, Value
from protocols.config import Table
from protocols.errors import ConfigError

from .base import Outputs, Runner, WrappedRunner
from .errors import RunnerError

BatchKey = tuple[Any, ...]
DEFAULT_WAIT_MS = 1.0


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_batch: int = 32  # rows per combined call
    max_wait_ms: float = DEFAULT_WAIT_MS  # how long a batch with a slot waits for more rows

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError("batching max_batch must be from 1 to 4096")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError("batching max_wait_ms must be from 0 to 1000")

    @classmethod
    def from_table(cls, table: Table) -> BatchConfig | None:
        """``batch_max`` (0 or absent: no batching) and ``batch_wait_ms`` of a model table."""
        size = table.integer("batch_max", 0, low=0, high=4096)
        wait = table.number("batch_wait_ms", DEFAULT_WAIT_MS, high=1000)
        return cls(size, wait) if size > 1 else None


@dataclass(slots=True)
class _Slot:
    inputs: Mapping[str, Value]
    rows: int
    done: trio.Event = field(default_factory=trio.Event)
    outputs: Outputs | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Batch:
    params: Mapping[str, Param]
    slots: list[_Slot] = field(default_factory=list)
    rows: int = 0
    closed: bool = False
    full: trio.Event = field(default_factory=trio.Event)


class BatchingRunner(WrappedRunner):
    """``inner`` with concurrent requests combined; see the module docstring."""

    def __init__(self, inner: Runner, config: BatchConfig) -> None:
        super().__init__(inner, {"batching": True, "batch_max": config.max_batch})
        self.config = config
        # Let enough requests in at once to fill a batch for every execution slot.
        self.concurrency = inner.concurrency * config.max_batch
        self._slots = trio.CapacityLimiter(inner.concurrency)
        self._forming: dict[BatchKey, _Batch] = {}
        self.calls = 0  # combined calls made, for tests and status
        self.rows = 0

    def status(self) -> dict[str, Any] | None:
        inner = self.inner.status() or {}
        return {**inner, "batching": {"calls": self.calls, "rows": self.rows}}

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        keyed = _key(inputs, params)
        if keyed is None:
            return await self.inner.infer(inputs, params)
        key, rows = keyed
        slot = _Slot(inputs, rows)
        batch = self._forming.get(key)
        leader = batch is None or batch.rows + rows > self.config.max_batch
        if leader:
            batch = self._forming[key] = _Batch(params)
        assert batch is not None
        batch.slots.append(slot)
        batch.rows += rows
        if batch.rows >= self.config.max_batch:
            batch.full.set()
        if leader:
            with trio.CancelScope(shield=True):
                await self._lead(key, batch)
            await trio.lowlevel.checkpoint_if_cancelled()  # its own caller may have gone
        else:
            try:
                await slot.done.wait()
            except trio.Cancelled:
                if not batch.closed:  # not sent yet: leave the batch
                    batch.slots.remove(slot)
                    batch.rows -= rows
                raise
        if slot.error is not None:
            raise slot.error
        assert slot.outputs is not None
        return slot.outputs

    async def _lead(self, key: BatchKey, batch: _Batch) -> None:
        async with self._slots:
            if not batch.full.is_set() and self.config.max_wait_ms > 0:
                with trio.move_on_after(self.config.max_wait_ms / 1000):
                    await batch.full.wait()
            batch.closed = True
            if self._forming.get(key) is batch:
                del self._forming[key]
            await self._run(batch)

    async def _run(self, batch: _Batch) -> None:
        slots = list(batch.slots)
        try:
            combined = _concat([s.inputs for s in slots])
            outputs = await self.inner.infer(combined, batch.params)
            parts = _split(outputs, [s.rows for s in slots])
        except (SwarmError, RunnerError) as exc:
            for slot in slots:
                slot.error = exc
        except Exception as exc:  # a bug in the inner runner must still answer every caller
            error = RunnerError(f"{self.info.name}: batched inference failed: {exc}")
            for slot in slots:
                slot.error = error
        else:
            for slot, part in zip(slots, parts, strict=True):
                slot.outputs = part
            self.calls += 1
            self.rows += batch.rows
        finally:
            for slot in slots:
                slot.done.set()


def _key(inputs: Mapping[str, Value], params: Mapping[str, Param]) -> tuple[BatchKey, int] | None:
    """What must match for requests to share a batch, and this request's rows."""
    if not inputs:
        return None
    shape: list[Any] = []
    rows: set[int] = set()
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, Tensor) and len(value.shape) >= 1:
            shape.append((name, value.dtype, tuple(value.shape[1:])))
            rows.add(value.shape[0])
        elif isinstance(value, str):
            shape.append((name, "text"))
            rows.add(1)
        elif isinstance(value, list):
            shape.append((name, "text"))
            rows.add(len(value))
        else:
            return None
    if len(rows) != 1 or 0 in rows:
        return None
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return (tuple(shape), frozen), rows.pop()


def _concat(requests: list[Mapping[str, Value]]) -> dict[str, Value]:
    first = requests[0]
    if len(requests) == 1:
        return dict(first)
    out: dict[str, Value] = {}
    for name, value in first.items():
        if isinstance(value, Tensor):
            arrays = [r[name].numpy() for r in requests]  # type: ignore[union-attr]
            out[name] = Tensor.from_numpy(np.concatenate(arrays, axis=0))
        else:
            texts: list[str] = []
            for r in requests:
                item = r[name]
                texts.extend([item] if isinstance(item, str) else item)  # type: ignore[arg-type]
            out[name] = texts
    return out


def _split(outputs: Outputs, rows: list[int]) -> list[Outputs]:
    total = sum(rows)
    parts: list[Outputs] = [{} for _ in rows]
    for name, value in outputs.items():
        length = _length(value)
        if length is None or length % total:
            raise RunnerError(
                f"batched output {name!r} has {length} rows, not a multiple of the {total} sent"
            )
        per = length // total
        start = 0
        for part, n in zip(parts, rows, strict=True):
            stop = start + n * per
            if isinstance(value, Tensor):
                part[name] = Tensor.from_numpy(value.numpy()[start:stop])
            else:
                part[name] = value[start:stop]  # type: ignore[index]
            start = stop
    return parts


def _length(value: Value) -> int | None:
    if isinstance(value, Tensor):
        return value.shape[0] if value.shape else None
    if isinstance(value, list):
        return len(value)
    return None
