"""The fake runner: deterministic outputs, latency on trio's clock, failures on demand."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import pytest
import trio
import trio.testing
from support import undeclared

from protocols import ConfigError, ErrorCode, SwarmError, Tensor
from runners.errors import BadInput, ModelNotFound, RunnerError
from runners.fake import MAX_CHUNKS, FakeFailure, FakeRunner


def rows(out: Mapping[str, object]) -> np.ndarray:
    tensor = out["embedding"]
    assert isinstance(tensor, Tensor) and tensor.dtype == "float32"
    return tensor.numpy()


async def test_text_rows_depend_on_their_text_only() -> None:
    fake = FakeRunner("echo", dim=16)
    batch = rows(await fake.infer({"text": ["a", "b", "a"]}, {}))
    alone = rows(await fake.infer({"text": "b"}, {}))
    again = rows(await FakeRunner("other", dim=16).infer({"text": ["b"]}, {}))
    assert batch.shape == (3, 16)
    np.testing.assert_array_equal(batch[0], batch[2])
    assert not np.array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(batch[1], alone[0])
    np.testing.assert_array_equal(alone, again)  # stable across instances (and processes)
    assert np.all((batch >= -0.5) & (batch < 0.5))


async def test_tensor_input_gives_twice_the_row_sums() -> None:
    fake = FakeRunner("echo", dim=4)
    x = np.array([[1.0, 2.0], [0.5, -3.0]], dtype=np.float32)
    got = rows(await fake.infer({"x": Tensor.from_numpy(x)}, {}))
    np.testing.assert_array_equal(got, [[6.0] * 4, [-5.0] * 4])


async def test_infer_takes_the_latency_on_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRunner("slow", latency_s=2.5)
    start = trio.current_time()
    out = await fake.infer({"text": "hi"}, {"chunks": 4})
    assert trio.current_time() - start == pytest.approx(2.5)
    assert isinstance(out["text"], str) and len(out["text"].split()) == 4


async def test_stream_splits_latency_over_chunks_and_matches_infer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRunner("slow", latency_s=1.0)
    inputs = {"text": ["some", "texts"]}
    times, chunks = [], []
    start = trio.current_time()
    async for chunk in fake.stream(inputs, {"chunks": 5}):
        times.append(trio.current_time() - start)
        chunks.append(chunk)
    assert times == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(set(c) == {"text"} and str(c["text"]).endswith(" ") for c in chunks)
    whole = await fake.infer(inputs, {"chunks": 5})
    assert "".join(str(c["text"]) for c in chunks) == whole["text"]


async def test_default_is_three_chunks() -> None:
    chunks = [c async for c in FakeRunner("f").stream({"text": "x"}, {})]
    assert len(chunks) == 3


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("BAD_REQUEST", BadInput),
        ("MODEL_NOT_FOUND", ModelNotFound),
        ("INTERNAL", RunnerError),
        ("OVERLOADED", FakeFailure),
        ("NOT_EXECUTED", FakeFailure),
    ],
)
async def test_fail_param_raises_an_error_with_that_code(
    code: str, error: type[SwarmError]
) -> None:
    fake = FakeRunner("flaky")
    inputs, params = {"text": "hi"}, {"fail": code}
    fake.check(inputs, params)  # admitted: it fails when it runs
    with pytest.raises(error) as raised:
        await fake.infer(inputs, params)
    assert raised.value.code is ErrorCode[code]
    with pytest.raises(error):
        async for _ in fake.stream(inputs, params):
            pytest.fail("a failing stream must not yield")


@pytest.mark.parametrize(
    ("inputs", "params", "message"),
    [
        ({"text": "a", "x": Tensor.from_numpy(np.ones((1, 2), np.float32))}, {}, "exactly one"),
        ({}, {}, "exactly one"),
        ({"x": Tensor.from_numpy(np.ones((1, 2), np.float64))}, {}, "dtype float64"),
        ({"x": Tensor.from_numpy(np.ones(2, np.float32))}, {}, "shape"),
        ({"text": "a"}, {"chunks": 0}, "chunks"),
        ({"text": "a"}, {"chunks": MAX_CHUNKS + 1}, "chunks"),
        ({"text": "a"}, {"chunks": True}, "chunks"),
        ({"text": "a"}, {"chunks": "3"}, "chunks"),
        ({"text": "a"}, {"fail": "NOPE"}, "fail"),
        ({"text": "a"}, {"temperature": 0.5}, "unknown params"),
    ],
)
async def test_bad_requests_are_refused(
    inputs: dict[str, object], params: dict[str, object], message: str
) -> None:
    fake = FakeRunner("f")
    with pytest.raises(BadInput, match=message):
        fake.check(inputs, params)  # type: ignore[arg-type]
    with pytest.raises(BadInput, match=message):
        await fake.infer(inputs, params)  # type: ignore[arg-type]


def test_info_names_it_a_fake() -> None:
    fake = FakeRunner("bench", latency_s=0.01, dim=32, concurrency=7)
    info = fake.info.describe()
    assert (info["name"], info["runner"], info["dim"], info["streams"]) == (
        "bench",
        "fake",
        32,
        True,
    )
    assert fake.concurrency == 7


async def test_outputs_are_declared_as_infer_and_stream_give_them() -> None:
    fake = FakeRunner("f", dim=4)
    assert fake.info.describe()["outputs"] == [
        {"name": "embedding", "kind": "tensor", "dtype": "float32", "shape": [-1, 4]},
        {"name": "text", "kind": "text", "shape": [1]},
    ]
    x = Tensor.from_numpy(np.ones((3, 2), np.float32))
    answers = [await fake.infer({"text": ["a", "b"]}, {}), await fake.infer({"x": x}, {})]
    answers += [chunk async for chunk in fake.stream({"text": "a"}, {"chunks": 2})]
    for answer in answers:
        assert undeclared(fake.info, answer) == []
    assert undeclared(fake.info, {"embedding": x, "extra": 1}) == [
        "embedding: float32 [3, 2], declared float32 (None, 4)",
        "extra: not declared",
    ]  # the check itself can fail


def test_constructor_refuses_nonsense() -> None:
    with pytest.raises(ConfigError, match="latency"):
        FakeRunner("f", latency_s=-1)
    with pytest.raises(ConfigError, match="dim"):
        FakeRunner("f", dim=0)


async def test_cheap_enough_for_a_thousand_requests_a_second() -> None:
    """A benchmark drives >1000 req/s through it; leave it room (this is ~50x slack)."""
    fake = FakeRunner("bench", dim=384)
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        await fake.infer({"text": f"request {i}"}, {})
    per_request = (time.perf_counter() - start) / n
    assert per_request < 1e-3 / 2
