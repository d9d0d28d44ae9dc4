"""FakeBackend: a scriptable HTTP server on 127.0.0.1, for failures real servers won't make on cue.

It stands in for any HTTP inference backend (vLLM, TEI, OVMS, OpenAI) at the
HTTP level only: a test queues the replies a path will give, in order (a
status with a JSON or raw body and headers, a hang, a dropped connection, an
SSE stream), and reads back the requests it got. Statuses and headers follow
RFC 9110 (Retry-After as delay-seconds or an HTTP-date). The stdlib
``ThreadingHTTPServer`` runs in a thread; every wait in it is bounded.

Protocol fakes for routes with no stand-in server (vLLM LoRA, TEI) build on
it by registering handlers (``route``) that compute a reply from the request.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG_LIMIT_S = 10.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``kind``: "answer", "hang", "drop" (close, no answer), "stream"."""

    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = "answer"
    lines: tuple[str, ...] = ()  # for "stream": each written and flushed, then a pause
    pause_s: float = 0.0
    delay_s: float = 0.0  # before answering


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[Seen], Reply]


class FakeBackend:
    """Start with ``with FakeBackend() as fake:``; ``fake.url`` is its base URL."""

    def __init__(self) -> None:
        self.plans: dict[str, deque[Reply]] = {}
        self.routes: dict[tuple[str, str], Handler] = {}
        self.seen: list[Seen] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def plan(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self.plans.setdefault(path, deque()).extend(replies)

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def requests_to(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path == path]

    def __enter__(self) -> FakeBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            queue = self.plans.get(seen.path)
            if queue:
                return queue.popleft()
        handler = self.routes.get((seen.method, seen.path))
        if handler is not None:
            return handler(seen)
        return Reply(404, {"error": {"message": f"no route {seen.method} {seen.path}"}})

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1


def _make_handler(fake: FakeBackend) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(self.command, self.path, dict(self.headers.items()), body)
            with fake._counted():
                reply = fake._next(seen)
                if reply.delay_s:
                    fake.released.wait(reply.delay_s)
                if reply.kind == "hang":
                    fake.released.wait(HANG_LIMIT_S)
                    self.close_connection = True
                    return
                if reply.kind == "drop":
                    self.close_connection = True
                    return
                if reply.kind == "stream":
                    self._stream(reply)
                    return
                self._answer(reply)

        def _answer(self, reply: Reply) -> None:
            data = reply.body if isinstance(reply.body, bytes) else b""
            if reply.body is not None and not isinstance(reply.body, bytes):
                data = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, reply: Reply) -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for line in reply.lines:
                try:
                    self.wfile.write(line.encode() + b"\n")
                    self.wfile.flush()
                except OSError:
                    return
                if reply.pause_s:
                    fake.released.wait(reply.pause_s)

        do_GET = _serve
        do_POST = _serve
        do_DELETE = _serve

    return _Handler
