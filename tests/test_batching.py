"""Dynamic batching: concurrent requests share one call and each gets its own rows back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
import trio
import trio.lowlevel
import trio.testing

from protocols import ErrorCode, Param, Tensor, Value
from protocols.config import Table
from protocols.errors import ConfigError
from runners.base import ModelInfo, Outputs, OutputSpec, Runner, TensorSpec, TextSpec
from runners.batching import BatchConfig, BatchingRunner
from runners.errors import BadInput, RunnerError


class FakeRowModel(Runner):
    """A fake model (no real one answers row-wise with a fixed cost per call this exactly):
    doubles ``x`` row-wise, echoes ``text`` lengths, and records the size of each call."""

    def __init__(self, latency_s: float = 0.01, concurrency: int = 1) -> None:
        self.latency_s = latency_s
        self.concurrency = concurrency
        self.calls: list[int] = []
        self.fail: str | None = None
        self.info = ModelInfo(
            name="rows",
            task="test",
            runner="fake",
            device="none",
            precision="fp32",
            max_batch=64,
            inputs=(
                TensorSpec("x", frozenset({"float32"}), (None, None), required=False),
                TextSpec("text", max_items=64, max_chars=100, required=False),
            ),
        )

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        await trio.sleep(self.latency_s)
        if self.fail == "bad":
            raise BadInput("refused by the model")
        if self.fail == "crash":
            raise ValueError("a bug")
        if "x" in inputs:
            x = inputs["x"]
            assert isinstance(x, Tensor)
            self.calls.append(x.shape[0])
            return {"y": Tensor.from_numpy(x.numpy() * 2), "tags": ["r"] * (2 * x.shape[0])}
        texts = inputs["text"]
        items = [texts] if isinstance(texts, str) else list(texts)  # type: ignore[arg-type]
        self.calls.append(len(items))
        sizes = np.array([[len(t)] for t in items], dtype=np.float32)
        return {"n": Tensor.from_numpy(sizes)}


def _x(rows: int, value: float) -> dict[str, Value]:
    return {"x": Tensor.from_numpy(np.full((rows, 3), value, dtype=np.float32))}


async def test_concurrent_requests_share_calls_and_get_their_own_rows() -> None:
    inner = FakeRowModel()
    runner = BatchingRunner(inner, BatchConfig(max_batch=16, max_wait_ms=5))
    results: dict[int, Outputs] = {}

    async def one(i: int) -> None:
        results[i] = await runner.infer(_x(1 + i % 3, float(i)), {})

    async with trio.open_nursery() as nursery:
        for i in range(24):
            nursery.start_soon(one, i)
    for i, out in results.items():
        y = out["y"]
        assert isinstance(y, Tensor)
        assert y.shape == (1 + i % 3, 3) and np.all(y.numpy() == 2 * i)
        assert out["tags"] == ["r"] * (2 * (1 + i % 3))  # lists cut by rows too
    assert sum(inner.calls) == sum(1 + i % 3 for i in range(24))
    assert len(inner.calls) < 24 / 3 and max(inner.calls) <= 16


class LearnsAtLoad(FakeRowModel):
    """A model that learns its outputs when it loads, as remote and generic runners do."""

    async def load(self) -> None:
        self.info = replace(self.info, outputs=(OutputSpec("y", "float32", (None, 3)),))


async def test_the_wrapper_announces_what_its_model_learnt_at_load() -> None:
    runner = BatchingRunner(LearnsAtLoad(), BatchConfig(max_batch=4, max_wait_ms=1))
    assert runner.info.outputs == () and runner.info.extra["batching"] is True
    await runner.load()
    assert [o.name for o in runner.info.outputs] == ["y"]
    assert runner.info.extra["batch_max"] == 4  # its own extra, still on top


async def test_texts_batch_and_different_params_do_not_mix() -> None:
    inner = FakeRowModel()
    runner = BatchingRunner(inner, BatchConfig(max_batch=8, max_wait_ms=5))
    got: dict[str, Outputs] = {}

    async def one(text: str, params: dict[str, Param]) -> None:
        got[text] = await runner.infer({"text": text}, params)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, "a" * (i + 1), {"mode": "p" if i % 2 else "q"})
    for text, out in got.items():
        n = out["n"]
        assert isinstance(n, Tensor) and n.numpy().tolist() == [[len(text)]]
    assert len(inner.calls) == 2 and sorted(inner.calls) == [3, 3]


async def test_a_lone_request_is_not_held_long(autojump_clock: trio.testing.MockClock) -> None:
    inner = FakeRowModel(latency_s=0.01)
    runner = BatchingRunner(inner, BatchConfig(max_batch=8, max_wait_ms=2))
    start = trio.current_time()
    await runner.infer(_x(1, 1.0), {})
    assert trio.current_time() - start == pytest.approx(0.012)


async def test_errors_reach_every_caller_of_the_batch() -> None:
    inner = FakeRowModel()
    runner = BatchingRunner(inner, BatchConfig(max_batch=8, max_wait_ms=5))
    for mode, error, code in (
        ("bad", BadInput, ErrorCode.BAD_REQUEST),
        ("crash", RunnerError, ErrorCode.INTERNAL),
    ):
        inner.fail = mode
        raised: list[BaseException] = []

        async def one(into: list[BaseException]) -> None:
            try:
                await runner.infer(_x(1, 0.0), {})
            except RunnerError as exc:
                into.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one, raised)
        assert len(raised) == 4 and all(isinstance(e, error) for e in raised)
        assert all(e.code is code for e in raised)  # type: ignore[attr-defined]
    inner.fail = None
    out = await runner.infer(_x(2, 3.0), {})  # and it serves on
    assert isinstance(out["y"], Tensor) and out["y"].shape == (2, 3)


async def test_a_caller_that_gives_up_does_not_fail_the_others() -> None:
    inner = FakeRowModel(latency_s=0.05)
    runner = BatchingRunner(inner, BatchConfig(max_batch=8, max_wait_ms=20))
    done: list[int] = []

    async def one(i: int, patience: float) -> None:
        with trio.move_on_after(patience):
            await runner.infer(_x(1, float(i)), {})
            done.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, 0.001)  # the leader gives up at once
        await trio.lowlevel.checkpoint()
        for i in range(1, 4):
            nursery.start_soon(one, i, 1.0)
    assert sorted(done) == [1, 2, 3]


def test_config_from_a_model_table() -> None:
    assert BatchConfig.from_table(Table({}, "models[0]")) is None
    config = BatchConfig.from_table(Table({"batch_max": 16, "batch_wait_ms": 3}, "models[0]"))
    assert config == BatchConfig(16, 3.0)
    with pytest.raises(ConfigError, match=r"models\[0\].batch_max"):
        BatchConfig.from_table(Table({"batch_max": -1}, "models[0]"))
