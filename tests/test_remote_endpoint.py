"""The HTTP endpoint against a real HTTP server that fails on cue (tests/fake_backend.py).

Every failure here travels over real loopback TCP: statuses, Retry-After,
hangs, dropped connections and a closed port, so what is checked is how the
endpoint reads the wire, not how it reacts to a mocked exception.
"""

from __future__ import annotations

import logging
import socket
import traceback
from collections.abc import Iterator

import pytest
import trio
from fake_backend import FakeBackend, Reply
from support import eventually

from protocols import ErrorCode
from protocols.config import Table
from protocols.errors import ConfigError
from runners.errors import BadInput
from runners.remote.endpoint import Endpoint, EndpointConfig
from runners.remote.errors import (
    BackendAuth,
    BackendBusy,
    BackendFailed,
    BackendGarbage,
    BackendRejected,
    BackendTimeout,
    BackendUnreachable,
    CircuitOpen,
)

KEYS = ("sk-live-AAAA1111", "sk-live-BBBB2222", "sk-live-CCCC3333")
OK = Reply(200, {"ok": True})


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    with FakeBackend() as server:
        yield server


def config(url: str, **overrides: object) -> EndpointConfig:
    fields: dict[str, object] = {
        "name": "backend",
        "base_url": url,
        "retries": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 5.0,
    }
    fields.update(overrides)
    return EndpointConfig(**fields)  # type: ignore[arg-type]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_503_is_retried_after_the_retry_after_delay(fake: FakeBackend) -> None:
    fake.plan("/x", Reply(503, {"error": "warming up"}, {"Retry-After": "1"}), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        start = trio.current_time()
        assert await endpoint.call_json("POST", "/x", body={}, idempotent=False) == {"ok": True}
        waited = trio.current_time() - start
    assert 1.0 <= waited < 2.5
    assert len(fake.requests_to("/x")) == 2


async def test_busy_longer_than_the_deadline_is_raised_at_once(fake: FakeBackend) -> None:
    fake.plan("/x", Reply(429, {"error": "slow down"}, {"Retry-After": "30"}))
    async with Endpoint(config(fake.url)) as endpoint:
        start = trio.current_time()
        with pytest.raises(BackendBusy) as caught:
            await endpoint.call_json("GET", "/x", idempotent=True, timeout_s=2)
        assert trio.current_time() - start < 1.0
    assert caught.value.code is ErrorCode.OVERLOADED
    assert caught.value.retry_after_s == 30.0
    assert "slow down" in str(caught.value)
    assert len(fake.requests_to("/x")) == 1


async def test_500_is_retried_only_when_the_call_is_idempotent(fake: FakeBackend) -> None:
    fake.plan("/safe", Reply(500, {"error": "oops"}), OK)
    fake.plan("/unsafe", Reply(500, {"error": "oops"}), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        assert await endpoint.call_json("POST", "/safe", idempotent=True) == {"ok": True}
        with pytest.raises(BackendFailed) as caught:
            await endpoint.call_json("POST", "/unsafe", idempotent=False)
    assert caught.value.code is ErrorCode.INTERNAL and caught.value.status == 500
    assert len(fake.requests_to("/safe")) == 2
    assert len(fake.requests_to("/unsafe")) == 1


async def test_garbage_json_is_a_backend_fault_not_retried(fake: FakeBackend) -> None:
    fake.plan("/x", Reply(200, b'{"choices": [tr'), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        with pytest.raises(BackendGarbage, match="not JSON"):
            await endpoint.call_json("GET", "/x", idempotent=True)
        assert endpoint.status()["failures"] == 1
    assert len(fake.requests_to("/x")) == 1


async def test_an_answer_nested_past_any_sense_is_garbage_too(fake: FakeBackend) -> None:
    """json.loads recurses: 100,000 brackets raised RecursionError, an untyped 500."""
    fake.plan("/x", Reply(200, b"[" * 100_000 + b"]" * 100_000), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        with pytest.raises(BackendGarbage, match="nested deeper than"):
            await endpoint.call_json("GET", "/x", idempotent=True)
        assert await endpoint.call_json("GET", "/x", idempotent=True) is not None  # serves on


async def test_a_hang_becomes_a_timeout_at_the_deadline(fake: FakeBackend) -> None:
    fake.plan("/x", Reply(kind="hang"), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        start = trio.current_time()
        with pytest.raises(BackendTimeout) as caught:
            await endpoint.call_json("POST", "/x", idempotent=True, timeout_s=0.5)
        assert 0.4 <= trio.current_time() - start < 1.5
    assert caught.value.code is ErrorCode.OUTCOME_UNKNOWN
    assert len(fake.requests_to("/x")) == 1  # no retry past the caller's deadline


async def test_a_dropped_connection_is_retried_when_idempotent(fake: FakeBackend) -> None:
    fake.plan("/x", Reply(kind="drop"), OK)
    fake.plan("/y", Reply(kind="drop"), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        assert await endpoint.call_json("GET", "/x", idempotent=True) == {"ok": True}
        with pytest.raises(BackendFailed, match="connection lost"):
            await endpoint.call_json("POST", "/y", idempotent=False)


async def test_a_closed_port_is_unreachable_after_the_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runners.remote")
    async with Endpoint(config(f"http://127.0.0.1:{closed_port()}")) as endpoint:
        with pytest.raises(BackendUnreachable) as caught:
            await endpoint.call_json("POST", "/x", idempotent=False)
    assert caught.value.code is ErrorCode.NOT_EXECUTED
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2  # unreachable is safe to retry even when not idempotent


async def test_4xx_carry_the_backend_message_and_are_not_retried(fake: FakeBackend) -> None:
    fake.plan("/bad", Reply(400, {"error": {"message": "max_tokens is too large"}}))
    fake.plan("/gone", Reply(404, {"detail": "Not Found"}))
    fake.plan("/tea", Reply(418, b"I'm a teapot"))
    fake.plan("/dep", Reply(424, {"error": "Inference failed", "error_type": "backend"}))
    async with Endpoint(config(fake.url)) as endpoint:
        with pytest.raises(BackendRejected, match="max_tokens is too large") as bad:
            await endpoint.call_json("POST", "/bad", idempotent=True)
        with pytest.raises(BackendRejected, match="Not Found") as gone:
            await endpoint.call_json("GET", "/gone", idempotent=True)
        with pytest.raises(BackendRejected, match="teapot"):
            await endpoint.call_json("GET", "/tea", idempotent=True)
        with pytest.raises(BackendFailed, match="Inference failed"):  # TEI: the model failed
            await endpoint.call_json("POST", "/dep", idempotent=False)
        assert endpoint.status()["breaker"] == "closed"
        assert endpoint.status()["failures"] == 1  # only the 424 counts against the backend
    assert isinstance(bad.value, BadInput) and bad.value.code is ErrorCode.BAD_REQUEST
    assert gone.value.status == 404
    assert [len(fake.requests_to(p)) for p in ("/bad", "/gone", "/tea")] == [1, 1, 1]


async def test_breaker_opens_after_n_failures_then_lets_one_probe_through(
    fake: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runners.remote")
    fake.plan("/x", Reply(500), Reply(500))
    cfg = config(fake.url, retries=0, breaker_failures=2, breaker_cooldown_s=0.5)
    now = [100.0]  # the breaker's clock, moved by hand: the cooldown takes no real time
    async with Endpoint(cfg, clock=lambda: now[0]) as endpoint:
        for _ in range(2):
            with pytest.raises(BackendFailed):
                await endpoint.call_json("GET", "/x", idempotent=True)
        assert endpoint.status()["breaker"] == "open"
        assert "circuit open after 2 consecutive failures" in caplog.text
        now[0] = 100.25
        with pytest.raises(CircuitOpen) as refused:
            await endpoint.call_json("GET", "/x", idempotent=True)
        assert refused.value.code is ErrorCode.NOT_EXECUTED
        assert refused.value.retry_after_s == 0.25
        assert len(fake.requests_to("/x")) == 2  # the refused call never left
        now[0] = 100.49
        assert endpoint.status()["breaker"] == "open"  # not a moment early
        now[0] = 100.5
        assert endpoint.status()["breaker"] == "half-open"
        fake.plan("/x", Reply(500))
        with pytest.raises(BackendFailed):  # the probe fails: open again
            await endpoint.call_json("GET", "/x", idempotent=True)
        assert endpoint.status()["breaker"] == "open"
        now[0] = 101.0  # a cooldown after the failed probe
        fake.plan("/x", OK)
        assert await endpoint.call_json("GET", "/x", idempotent=True) == {"ok": True}
        assert endpoint.status()["breaker"] == "closed"
        assert endpoint.status()["failures"] == 0


async def test_concurrency_is_limited_per_endpoint(fake: FakeBackend) -> None:
    fake.plan("/x", *[Reply(200, {"ok": True}, delay_s=0.2)] * 6)
    seen_in_flight: list[int] = []
    async with Endpoint(config(fake.url, max_concurrency=2)) as endpoint:

        async def one() -> None:
            await endpoint.call_json("POST", "/x", idempotent=True)
            seen_in_flight.append(endpoint.status()["in_flight"])

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
        elapsed = trio.current_time() - start
    assert fake.max_in_flight == 2
    assert max(seen_in_flight) <= 2
    assert elapsed >= 0.55  # three rounds of two


async def test_waiting_for_a_slot_past_the_deadline_is_busy_and_sends_nothing(
    fake: FakeBackend,
) -> None:
    fake.plan("/slow", Reply(200, {"ok": True}, delay_s=1.0))
    cfg = config(fake.url, max_concurrency=1)
    async with Endpoint(cfg) as endpoint, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: endpoint.call_json("GET", "/slow", idempotent=True))
        await eventually(lambda: endpoint.status()["in_flight"] == 1)  # it holds the slot
        with pytest.raises(BackendBusy, match="busy"):
            await endpoint.call_json("GET", "/other", idempotent=True, timeout_s=0.3)
    assert fake.requests_to("/other") == []


async def test_keys_are_used_round_robin_on_the_wire(fake: FakeBackend) -> None:
    fake.plan("/x", *[OK] * 6)
    async with Endpoint(config(fake.url, api_keys=KEYS)) as endpoint:
        for _ in range(6):
            await endpoint.call_json("GET", "/x", idempotent=True)
        keys = endpoint.status()["keys"]
    sent = [s.headers["Authorization"] for s in fake.requests_to("/x")]
    assert sent == [f"Bearer {k}" for k in KEYS * 2]
    assert [k["label"] for k in keys] == ["key#1", "key#2", "key#3"]
    assert [k["uses"] for k in keys] == [2, 2, 2]


async def test_priority_keys_and_a_429_moves_to_the_next_key_without_waiting(
    fake: FakeBackend,
) -> None:
    fake.plan("/x", OK, Reply(429, {"error": "rate limited"}, {"Retry-After": "30"}), OK, OK)
    cfg = config(fake.url, api_keys=KEYS[:2], key_strategy="priority")
    async with Endpoint(cfg) as endpoint:
        await endpoint.call_json("GET", "/x", idempotent=True)
        start = trio.current_time()
        await endpoint.call_json("GET", "/x", idempotent=True)
        assert trio.current_time() - start < 1.0  # key#2 need not wait out key#1's limit
        await endpoint.call_json("GET", "/x", idempotent=True)
        keys = endpoint.status()["keys"]
    sent = [s.headers["Authorization"][-8:] for s in fake.requests_to("/x")]
    assert sent == ["AAAA1111", "AAAA1111", "BBBB2222", "BBBB2222"]
    assert keys[0]["failures"] == 1 and keys[0]["benched_s"] > 25
    assert [k["uses"] for k in keys] == [2, 2]


async def test_least_loaded_spreads_concurrent_calls_over_keys(fake: FakeBackend) -> None:
    fake.plan("/x", *[Reply(200, {"ok": True}, delay_s=0.3)] * 3)
    cfg = config(fake.url, api_keys=KEYS, key_strategy="least-loaded")
    async with Endpoint(cfg) as endpoint, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lambda: endpoint.call_json("GET", "/x", idempotent=True))
    sent = {s.headers["Authorization"] for s in fake.requests_to("/x")}
    assert sent == {f"Bearer {k}" for k in KEYS}


async def test_stream_opening_is_retried_then_lines_arrive(fake: FakeBackend) -> None:
    lines = ("data: one", "", ": a comment", "data: two", "")
    fake.plan(
        "/s", Reply(503, {"error": "busy"}, {"Retry-After": "0"}), Reply(kind="stream", lines=lines)
    )
    async with Endpoint(config(fake.url)) as endpoint:
        async with endpoint.stream_lines("POST", "/s", body={"stream": True}) as got:
            received = [line async for line in got]
        assert endpoint.status()["in_flight"] == 0
    assert received == list(lines)
    assert len(fake.requests_to("/s")) == 2


async def test_a_stream_that_stalls_after_its_first_byte_is_not_retried(fake: FakeBackend) -> None:
    fake.plan("/s", Reply(kind="stream", lines=("data: one", "", "data: two"), pause_s=3), OK)
    async with Endpoint(config(fake.url)) as endpoint:
        received: list[str] = []
        with pytest.raises(BackendTimeout):
            async with endpoint.stream_lines("POST", "/s", timeout_s=0.5) as got:
                async for line in got:
                    received.append(line)
        assert endpoint.status()["failures"] == 1
    assert received[:1] == ["data: one"]
    assert len(fake.requests_to("/s")) == 1


async def test_a_stream_refused_with_400_raises_at_open(fake: FakeBackend) -> None:
    fake.plan("/s", Reply(400, {"error": {"message": "prompt too long"}}))
    async with Endpoint(config(fake.url)) as endpoint:
        with pytest.raises(BackendRejected, match="prompt too long"):
            async with endpoint.stream_lines("POST", "/s") as got:
                async for _ in got:
                    pass


async def test_call_raw_returns_bytes_and_empty_json_is_none(fake: FakeBackend) -> None:
    fake.plan("/raw", Reply(200, b"Success: LoRA adapter 'x' added successfully."))
    fake.plan("/empty", Reply(200, b""))
    async with Endpoint(config(fake.url)) as endpoint:
        assert (await endpoint.call_raw("POST", "/raw", idempotent=False)).startswith(b"Success")
        assert await endpoint.call_json("GET", "/empty", idempotent=True) is None


async def test_keys_never_leak(
    fake: FakeBackend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys go on the wire and nowhere else: not logs, errors, tracebacks, status or reprs."""
    caplog.set_level(logging.DEBUG)
    env_key = "sk-env-DDDD4444"
    monkeypatch.setenv("SWARM_TEST_KEY", env_key)
    secrets = (*KEYS[:2], env_key)
    # The backend echoes the key it got back in its error body, as some do.
    fake.plan("/auth", Reply(401, {"error": {"message": f"invalid api key {KEYS[0]}"}}))
    fake.plan("/x", Reply(500, {"error": f"upstream rejected {KEYS[1]}"}), Reply(kind="drop"))
    cfg = config(fake.url, api_keys=KEYS[:2], key_env=("SWARM_TEST_KEY",), retries=1)
    observed: list[str] = [repr(cfg), str(cfg)]
    async with Endpoint(cfg) as endpoint:
        with pytest.raises(BackendAuth) as auth:
            await endpoint.call_json("GET", "/auth", idempotent=True)
        with pytest.raises(BackendFailed) as failed:
            await endpoint.call_json("GET", "/x", idempotent=True)
        observed += [repr(endpoint), str(endpoint.status())]
    for error in (auth.value, failed.value):
        observed += [str(error), repr(error), "".join(traceback.format_exception(error))]
    observed += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert "key#1" in str(auth.value)
    assert auth.value.code is ErrorCode.INTERNAL
    wire = {s.headers["Authorization"] for s in fake.seen}
    assert f"Bearer {env_key}" in wire  # the env key was used...
    for secret in secrets:
        for text in observed:
            assert secret not in text  # ...and shown nowhere


def test_config_from_table_reads_every_field() -> None:
    table = Table(
        {
            "name": "vllm-a",
            "base_url": "http://127.0.0.1:8000/openai",
            "api_keys": ["k1", "k2"],
            "key_env": "OPENAI_API_KEY",
            "key_strategy": "least-loaded",
            "max_concurrency": 4,
            "connect_timeout_s": 1,
            "timeout_s": 30,
            "retries": 0,
            "backoff_base_s": 0.5,
            "backoff_max_s": 2,
            "breaker_failures": 3,
            "breaker_cooldown_s": 10,
        },
        "models[0]",
    )
    cfg = EndpointConfig.from_table(table)
    table.done()
    assert cfg.api_keys == ("k1", "k2") and cfg.key_env == ("OPENAI_API_KEY",)
    assert (cfg.max_concurrency, cfg.timeout_s, cfg.retries) == (4, 30.0, 0)
    assert "k1" not in repr(cfg)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"base_url": "http://h"}, r"models\[0\]\.name: required"),
        ({"name": "a", "base_url": "ftp://h"}, r"models\[0\]\.base_url: expected http"),
        ({"name": "a", "base_url": "http://u:p@h"}, r"models\[0\]\.base_url: must not hold"),
        ({"name": "a", "base_url": "http://h", "key_strategy": "random"}, r"key_strategy"),
        ({"name": "a", "base_url": "http://h", "max_concurrency": 0}, r"max_concurrency"),
        ({"name": "a", "base_url": "http://h", "key_env": ["1BAD"]}, r"key_env"),
        ({"name": "a", "base_url": "http://h", "backoff_base_s": 9}, r"backoff_base_s"),
    ],
)
def test_bad_config_fields_are_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EndpointConfig.from_table(Table(data, "models[0]"))


def test_a_missing_key_variable_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_NO_SUCH_KEY", raising=False)
    cfg = config("http://127.0.0.1:9", key_env=("SWARM_NO_SUCH_KEY",))
    with pytest.raises(ConfigError, match="SWARM_NO_SUCH_KEY"):
        Endpoint(cfg)
