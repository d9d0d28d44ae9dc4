"""One HTTP backend (an OpenAI-compatible server, TEI, OVMS...) as runners see it.

Runners speak a backend's protocol; this module moves the bytes and decides,
once for all of them, what a failure means and whether trying again is safe:

- every call waits for one of ``max_concurrency`` slots (a ``trio.CapacityLimiter``),
  then asks the circuit breaker, then takes an API key from the key pool;
- HTTP statuses and transport errors become the ``BackendError`` tree (see
  ``errors``), so the node can tell its caller whether the work ran;
- failures are retried with full-jitter backoff only where that is safe
  (nothing ran, or the caller says the call is idempotent), honouring
  Retry-After, and never past the caller's deadline;
- API keys are secrets: they go into the Authorization header and nowhere
  else. They are scrubbed from any text put in an error, hidden in the config's
  repr, and shown in ``status()`` and logs only by label (``key#1``).

httpx runs on trio through anyio. Paths are relative to ``base_url`` (the
server's root, e.g. ``http://127.0.0.1:8000``; a prefix such as ``/openai`` is
kept). Proxy variables of the environment are ignored: backends are addressed
directly. A response body is read whole up to ``MAX_BODY_BYTES``, a streamed
line up to ``MAX_LINE_BYTES``: a backend cannot make us allocate without bound.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import trio

from protocols.resilience import Backoff, BreakerState, CircuitBreaker, Clock, parse_retry_after

from ._wire import (
    FAILURES,
    MAX_BODY_BYTES,
    MAX_ERROR_CHARS,
    Lines,
    decode_json,
    decode_raw,
    error_detail,
    read_bounded,
    translated,
)
from .config import EndpointConfig
from .errors import (
    BackendAuth,
    BackendBusy,
    BackendError,
    BackendFailed,
    BackendRejected,
    BackendTimeout,
    BackendUnreachable,
    CircuitOpen,
)
from .keys import KeyLease, KeyPool

__all__ = ["Endpoint", "EndpointConfig"]

RETRY_AFTER_CAP_S = 600.0
USER_AGENT = "swarm-node"

log = logging.getLogger(__name__)
T = TypeVar("T")
_ALIVE = (BackendBusy, BackendAuth, BackendRejected)  # it answered: alive, only unwilling


class Endpoint:
    """Calls to one backend with limits, retries, a breaker and a key pool (see the module)."""

    def __init__(
        self,
        config: EndpointConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        secrets = config.resolve_keys(os.environ if environ is None else environ)
        self._keys = KeyPool(secrets, config.key_strategy, clock)
        self._secrets = sorted(set(secrets), key=len, reverse=True)
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s, clock)
        self._backoff = Backoff(config.backoff_base_s, config.backoff_max_s)
        self._rng = rng or random.Random()
        self._limiter = trio.CapacityLimiter(config.max_concurrency)
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            transport=transport,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=config.max_concurrency,
                max_keepalive_connections=config.max_concurrency,
            ),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"Endpoint({self.config.name!r}, {self.config.base_url!r})"

    @property
    def name(self) -> str:
        return self.config.name

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def status(self) -> dict[str, Any]:
        """Plain data for ``swarm status``: no key text, only labels and counts."""
        return {
            "name": self.config.name,
            "base_url": self.config.base_url,
            "breaker": str(self._breaker.state),
            "in_flight": self._limiter.borrowed_tokens,
            "max_concurrency": self.config.max_concurrency,
            "failures": self._breaker.failures,
            "keys": self._keys.status(),
        }

    async def call_json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        idempotent: bool,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The parsed JSON answer (None for an empty 2xx body); raises BackendError."""
        return await self._call(
            method, path, body, None, idempotent, timeout_s, headers, decode_json
        )

    async def call_raw(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        idempotent: bool,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """The answer's bytes; ``content`` sends raw bytes instead of JSON ``body``."""
        return await self._call(
            method, path, body, content, idempotent, timeout_s, headers, decode_raw
        )

    def stream_lines(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """``async with`` it to iterate the answer's text lines (for SSE).

        Opening is retried like a call (nothing has streamed yet); once the
        first byte has arrived a failure is raised from the iterator, never
        retried. ``timeout_s`` bounds the whole stream.
        """
        return self._stream(method, path, body, timeout_s, idempotent)

    # -- the retry loop ---------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: Any,
        content: bytes | None,
        idempotent: bool,
        timeout_s: float | None,
        headers: Mapping[str, str] | None,
        decode: Callable[[str, bytes], T],
    ) -> T:
        deadline = trio.current_time() + (timeout_s or self.config.timeout_s)
        attempt = 0
        while True:
            try:
                return await self._attempt(method, path, body, content, headers, deadline, decode)
            except BackendError as exc:
                await self._pause_or_raise(exc, attempt, idempotent, deadline, method, path)
                attempt += 1

    async def _pause_or_raise(
        self,
        exc: BackendError,
        attempt: int,
        idempotent: bool,
        deadline: float,
        method: str,
        path: str,
    ) -> None:
        """Sleep before the next attempt, or re-raise ``exc`` when retrying is unsafe or late."""
        delay = self._retry_delay(exc, attempt, idempotent)
        if delay is None or trio.current_time() + delay >= deadline:
            raise exc
        log.info(
            "%s: %s %s failed (%s), attempt %d of %d, retrying in %.2f s",
            self.config.name,
            method,
            path,
            type(exc).__name__,
            attempt + 1,
            self.config.retries + 1,
            delay,
        )
        await trio.sleep(delay)

    def _retry_delay(self, exc: BackendError, attempt: int, idempotent: bool) -> float | None:
        if attempt >= self.config.retries:
            return None
        safe = isinstance(exc, BackendUnreachable | BackendBusy) or (
            idempotent and isinstance(exc, BackendTimeout | BackendFailed)
        )
        if not safe:
            return None
        delay = self._backoff.delay(attempt, self._rng)
        # A 429 is often one key's rate limit: another key need not wait it out.
        other_key = exc.status == 429 and self._keys.any_free()
        if isinstance(exc, BackendBusy) and exc.retry_after_s is not None and not other_key:
            delay = max(delay, exc.retry_after_s)
        return delay

    # -- one attempt --------------------------------------------------------------------

    async def _attempt(
        self,
        method: str,
        path: str,
        body: Any,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        deadline: float,
        decode: Callable[[str, bytes], T],
    ) -> T:
        async with self._slot(deadline, path):
            with self._leased(path) as call:
                lease = call.lease
                request = self._build(method, path, body, content, headers, lease, deadline)
                where = f"{method} {path}"
                with translated(self, where, deadline):
                    response = await self._client.send(request, stream=True)
                    try:
                        data = await read_bounded(response, MAX_BODY_BYTES, self, where)
                    finally:
                        await response.aclose()
                self._judge(response, data, lease, where)
                result = decode(where, data)
                call.verdict = True
                return result

    @asynccontextmanager
    async def _slot(self, deadline: float, path: str) -> AsyncIterator[None]:
        """One of ``max_concurrency`` slots, waited for until the deadline at most."""
        acquired = False
        with trio.move_on_at(deadline):
            await self._limiter.acquire()
            acquired = True
        if not acquired:
            raise BackendBusy(
                f"{self.config.name}: all {self.config.max_concurrency} connections busy "
                f"until the deadline; {path} not sent"
            )
        try:
            yield
        finally:
            self._limiter.release()

    def _admit(self, path: str) -> KeyLease | None:
        wait = self._breaker.admit()
        if wait is not None:
            raise CircuitOpen(
                f"{self.config.name}: circuit open after {self._breaker.failures} failures; "
                f"{path} not sent",
                retry_after_s=wait,
            )
        return self._keys.acquire()

    @contextmanager
    def _leased(self, path: str) -> Iterator[_Call]:
        """A call admitted past the breaker with a key leased; on leaving, the key goes
        back and the breaker hears the verdict: the body's, or one read off the error
        that ended it (a failure of the backend, or an answer proving it alive)."""
        call = _Call(self._admit(path))
        try:
            yield call
        except FAILURES:
            call.verdict = False
            raise
        except _ALIVE:
            call.verdict = True
            raise
        finally:
            self._settle(call.verdict, call.lease)

    def _settle(self, verdict: bool | None, lease: KeyLease | None) -> None:
        self._keys.release(lease)
        if verdict is True:
            self._breaker.success()
        elif verdict is False:
            was_open = self._breaker.state is not BreakerState.CLOSED
            self._breaker.failure()
            if not was_open and self._breaker.state is BreakerState.OPEN:
                log.warning(
                    "%s: circuit open after %d consecutive failures; no calls for %.1f s",
                    self.config.name,
                    self._breaker.failures,
                    self.config.breaker_cooldown_s,
                )
        else:
            self._breaker.abandon()

    def _build(
        self,
        method: str,
        path: str,
        body: Any,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        lease: KeyLease | None,
        deadline: float,
    ) -> httpx.Request:
        merged = dict(headers or {})
        if lease is not None:
            merged["Authorization"] = f"Bearer {lease.secret}"
        left = max(deadline - trio.current_time(), 0.001)
        timeout = httpx.Timeout(left, connect=min(self.config.connect_timeout_s, left))
        if content is not None:
            return self._client.build_request(
                method, path, content=content, headers=merged, timeout=timeout
            )
        return self._client.build_request(method, path, json=body, headers=merged, timeout=timeout)

    def _judge(
        self, response: httpx.Response, data: bytes, lease: KeyLease | None, where: str
    ) -> None:
        """Return for a 2xx; raise the BackendError its status means otherwise."""
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = self.scrub(error_detail(data))
        prefix = f"{self.config.name}: {where} -> HTTP {status}"
        if status in (429, 503):
            retry_after = parse_retry_after(
                response.headers.get("Retry-After"), now=time.time(), cap_s=RETRY_AFTER_CAP_S
            )
            if status == 429:
                bench = retry_after if retry_after is not None else self._backoff.max_s
                self._keys.bench(lease, bench)
            raise BackendBusy(f"{prefix}: {detail}", status=status, retry_after_s=retry_after)
        if status in (401, 403):
            self._keys.bench(lease, self.config.breaker_cooldown_s)
            label = lease.label if lease is not None else "no key"
            raise BackendAuth(f"{prefix}: refused {label}: {detail}", status=status)
        if 400 <= status < 500 and status != 424:  # 424: the model failed (TEI)
            raise BackendRejected(f"{prefix}: {detail}", status=status)
        raise BackendFailed(f"{prefix}: {detail}", status=status)

    def scrub(self, text: str) -> str:
        """``text`` with every key of this endpoint replaced by ``<key>``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "<key>")
        return text

    # -- streams ------------------------------------------------------------------------

    @asynccontextmanager
    async def _stream(
        self, method: str, path: str, body: Any, timeout_s: float | None, idempotent: bool
    ) -> AsyncIterator[AsyncIterator[str]]:
        deadline = trio.current_time() + (timeout_s or self.config.timeout_s)
        attempt = 0
        while True:
            try:
                async with self._open_stream(method, path, body, deadline) as lines:
                    yield lines
                    return
            except _StreamStarted as started:
                raise started.error from started.error.__cause__
            except BackendError as exc:
                await self._pause_or_raise(exc, attempt, idempotent, deadline, method, path)
                attempt += 1

    @asynccontextmanager
    async def _open_stream(
        self, method: str, path: str, body: Any, deadline: float
    ) -> AsyncIterator[AsyncIterator[str]]:
        where = f"{method} {path}"
        async with self._slot(deadline, path):
            with self._leased(path) as call:
                lease = call.lease
                request = self._build(method, path, body, None, None, lease, deadline)
                with translated(self, where, deadline):
                    response = await self._client.send(request, stream=True)
                try:
                    if not 200 <= response.status_code < 300:
                        with translated(self, where, deadline):
                            data = await read_bounded(response, MAX_ERROR_CHARS * 16, self, where)
                        self._judge(response, data, lease, where)
                    lines = Lines(self, response, where, deadline)
                    try:
                        yield lines
                    except BackendError as exc:  # past the first byte: never retried
                        raise _StreamStarted(exc) from exc
                    finally:
                        # The backend did its part unless its stream broke; a consumer
                        # that stops early or fails on its own is no fault of the backend.
                        call.verdict = lines.failure is None
                        with trio.CancelScope(shield=True):
                            await lines.aclose()
                finally:
                    with trio.CancelScope(shield=True):
                        await response.aclose()


@dataclass(slots=True)
class _Call:
    lease: KeyLease | None
    verdict: bool | None = None  # None: neither (cancelled, or the caller's own error)


class _StreamStarted(Exception):
    """Carries an error raised after the stream's first byte past the retry loop."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error))
        self.error = error
