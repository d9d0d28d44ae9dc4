"""The gateway's shared plumbing: what it asks of the node, body reading, auth.

Routes (``openai.py``, ``responses.py``, ``anthropic.py``, ``ollama.py``,
``kserve.py``, ``health``; the generation APIs share ``generate.py``) see the
node only through ``Backend``: run a Request, list the models the swarm serves
with their descriptions, and this node's status. So the HTTP side holds no routing of its
own: every request becomes a swarm ``Request`` run by ``InferenceService``,
routed and failed over like one that came over libp2p. Optional headers
carry what swarm requests have and the APIs lack: ``X-Swarm-Deadline-Ms``
(the request's time budget; past it, 504), ``X-Swarm-Priority`` (high,
normal or low: the admission order on the node that runs it) and
``X-Swarm-Verify`` (N: run the job on N more nodes and compare; read by the
OpenAI routes, /v1/embeddings and the completions, and KServe's infer). A verified
job's answer carries ``X-Swarm-Verify-Verdict`` (agree, disagree, unsure or
unverified), ``X-Swarm-Verify-Nodes`` (who answered; one list per job, ";"
between jobs), and, when there are any, ``X-Swarm-Verify-Against`` and
``X-Swarm-Verify-Min-Cosine`` (``verify_headers``). ``X-Swarm-Hedge-Ms`` (0 to
MAX_HEDGE_MS) hedges the job: no first chunk or answer in that time, and the node
sends it to a second peer too, taking whichever answers first (0: never; absent:
the node's ``[router] hedge_ms``).
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import trio
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from bootstrap.table import PeerTable, live_peers
from node.errors import sole_error
from node.observe.feed import Feed
from protocols import (
    MAX_HEDGE_MS,
    MAX_VERIFY,
    Priority,
    Request,
    Result,
    SwarmError,
    Value,
    bounded_json,
)
from runners.base import ModelInfo, gather

from .config import GatewayConfig
from .errors import HTTPFailure, error_response, swarm_error_response

log = logging.getLogger(__name__)

DEADLINE_HEADER = "x-swarm-deadline-ms"  # the request's time budget, in milliseconds
PRIORITY_HEADER = "x-swarm-priority"  # high, normal or low
API_KEY_HEADER = "x-api-key"  # Anthropic's clients send their key here, not as a bearer
VERIFY_HEADER = "x-swarm-verify"  # 0 to MAX_VERIFY: extra nodes to run the job on
HEDGE_HEADER = "x-swarm-hedge-ms"  # 0 to MAX_HEDGE_MS: when to ask a second peer too
MAX_DEADLINE_MS = 24 * 3600 * 1000
Emit = Callable[[Mapping[str, Value]], Awaitable[None]]
EmitFor = Callable[[int, Mapping[str, Value]], Awaitable[None]]  # job index, its chunk
T = TypeVar("T")
Handler = Callable[[HTTPRequest], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Backend:
    """What the gateway needs of its node."""

    execute: Callable[[Request, Emit], Awaitable[Result]]
    models: Callable[[], dict[str, Mapping[str, Any]]]  # casefolded name -> description
    status: Callable[[], Mapping[str, Any]]
    # The Prometheus text exposition of this node's metrics; None: no /metrics.
    metrics: Callable[[], bytes] | None = None
    # Load / unload a model this node's config declares (None: the routes answer 404).
    load_model: Callable[[str], Awaitable[Mapping[str, Any]]] | None = None
    unload_model: Callable[[str], Awaitable[Mapping[str, Any]]] | None = None
    # The node's live events (peers, jobs, load) and recent jobs; None: no /ws topics.
    feed: Feed | None = None
    # Live peers' records as the membership table holds them (the page's swarm graph).
    table: Callable[[], PeerTable | None] = lambda: None
    # The models served here and the backends behind them, with their state (no keys
    # or backend addresses); None: the MCP tool list_backends answers that it cannot.
    backends: Callable[[], Mapping[str, Any]] | None = None
    # Where a job for (model, strategy, priority) would run now and the candidates with
    # their scores, running nothing (Router.preview); None: select_peer cannot answer.
    select_peer: Callable[[str, str | None, Priority], Mapping[str, Any]] | None = None


def swarm_models(
    local: Iterable[ModelInfo], table: PeerTable | None
) -> dict[str, Mapping[str, Any]]:
    """Every model served here or by a linked peer, by casefolded name; ours win.

    A description is ``ModelInfo.describe()`` as capability records carry it.
    """
    found: dict[str, Mapping[str, Any]] = {}
    for info in local:
        found.setdefault(info.name.casefold(), info.describe())
    for peer in live_peers(table) if table is not None else ():
        described = (peer.body or {}).get("models") or []
        for item in described:
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                found.setdefault(item["name"].casefold(), item)
    return found


def find_model(backend: Backend, name: Any) -> Mapping[str, Any]:
    """The description of the model ``name``, or 404."""
    if not isinstance(name, str) or not name:
        raise HTTPFailure(400, "give the model's name in 'model'", "missing_model")
    described = backend.models().get(name.casefold())
    if described is None:
        raise HTTPFailure(
            404, f"no node of this swarm serves the model {name!r}", "model_not_found"
        )
    return described


@dataclass(frozen=True, slots=True)
class Options:
    """What a client may say about any request in headers (swarm's own, optional)."""

    deadline_ms: int | None = None
    priority: Priority = Priority.NORMAL
    verify: int = 0
    hedge_ms: int | None = None


def options(request: HTTPRequest) -> Options:
    """``X-Swarm-Deadline-Ms``, ``X-Swarm-Priority``, ``X-Swarm-Verify`` and
    ``X-Swarm-Hedge-Ms``, checked (400 if malformed)."""
    return options_from(request.headers.get)


def options_from(header: Callable[[str], str | None]) -> Options:
    """``options`` from ``header(name)`` (the value of a lower-case header, or None):
    HTTP headers, or the gRPC port's metadata."""
    deadline = header(DEADLINE_HEADER)
    deadline_ms = None
    if deadline is not None:
        if not deadline.strip().isdigit() or not 0 < int(deadline) <= MAX_DEADLINE_MS:
            message = f"{DEADLINE_HEADER} must be milliseconds from 1 to {MAX_DEADLINE_MS}"
            raise HTTPFailure(400, message, "invalid_header")
        deadline_ms = int(deadline)
    priority = Priority.NORMAL
    if (text := header(PRIORITY_HEADER)) is not None:
        try:
            priority = Priority.parse(text.strip())
        except ValueError as exc:
            raise HTTPFailure(400, f"{PRIORITY_HEADER}: {exc}", "invalid_header") from exc
    verify = 0
    if (text := header(VERIFY_HEADER)) is not None:
        if not text.strip().isdigit() or int(text) > MAX_VERIFY:
            message = f"{VERIFY_HEADER} must be a whole number from 0 to {MAX_VERIFY}"
            raise HTTPFailure(400, message, "invalid_header")
        verify = int(text)
    hedge_ms = None
    if (text := header(HEDGE_HEADER)) is not None:
        if not text.strip().isdigit() or int(text) > MAX_HEDGE_MS:
            message = f"{HEDGE_HEADER} must be milliseconds from 0 to {MAX_HEDGE_MS}"
            raise HTTPFailure(400, message, "invalid_header")
        hedge_ms = int(text)
    return Options(deadline_ms, priority, verify, hedge_ms)


def verify_field(body: Mapping[str, Any], given: int) -> int:
    """A body's ``verify`` (an extension of OpenAI's API), else the header's."""
    value = body.get("verify")
    if value is None:
        return given
    if type(value) is not int or not 0 <= value <= MAX_VERIFY:
        raise HTTPFailure(
            400, f"'verify' must be an integer from 0 to {MAX_VERIFY}", "invalid_input"
        )
    return value


def verify_headers(metas: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """How the runs of verified jobs compared (their results' meta), as response headers
    (none when no job asked); several jobs (OpenAI's ``n``) agree only when each did."""
    metas = [m for m in metas if m.get("verify_verdict") is not None]
    if not metas:
        return {}
    verdicts = {str(m["verify_verdict"]) for m in metas}
    verdict = next((v for v in ("disagree", "unsure", "unverified") if v in verdicts), "agree")
    headers = {
        "x-swarm-verify-verdict": verdict,
        "x-swarm-verify-nodes": ";".join(str(m.get("verify_nodes", "")) for m in metas),
    }
    against = sorted({n for m in metas for n in str(m.get("verify_against") or "").split(",") if n})
    if against:
        headers["x-swarm-verify-against"] = ",".join(against)
    cosines = [c for m in metas if isinstance(c := m.get("verify_min_cosine"), float)]
    if cosines:
        headers["x-swarm-verify-min-cosine"] = str(min(cosines))
    return headers


async def no_chunks(chunk: Mapping[str, Value]) -> None:
    """A job that does not stream emits nothing."""


async def run_while_connected(backend: Backend, http: HTTPRequest, job: Request) -> Result:
    """Run ``job`` (not streamed) while its HTTP client waits: see ``while_connected``."""
    return await while_connected(http, lambda: backend.execute(job, no_chunks))


async def while_connected(http: HTTPRequest, work: Callable[[], Awaitable[T]]) -> T:
    """``work()``, cancelled if the HTTP client goes away first: a job is then
    stopped on this node and on the peer running it, instead of running to an
    answer nobody reads. Call after the body is read: the next ASGI message is
    then the disconnect, if any."""
    done: list[T] = []
    try:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await http.receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            done.append(await work())
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise sole_error(group) from None  # the job's own error, as if no nursery were here
    if not done:
        raise HTTPFailure(499, "the client closed the connection", "client_closed")
    return done[0]


async def execute_all(backend: Backend, jobs: Sequence[Request], emit: EmitFor) -> list[Result]:
    """Run ``jobs`` at once (the swarm may spread them over peers), ``emit(i, chunk)``
    for job i's chunks; the first job to fail cancels the rest and is raised."""

    def job(i: int) -> Callable[[], Awaitable[Result]]:
        async def chunk(outputs: Mapping[str, Value]) -> None:
            await emit(i, outputs)

        return lambda: backend.execute(jobs[i], chunk)

    return await gather([job(i) for i in range(len(jobs))])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body; 413 past ``limit`` bytes (read no further than that)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPFailure(413, f"the body is over {limit} bytes", "request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPFailure(413, f"the body is over {limit} bytes", "request_too_large")
    return bytes(body)


def parse_json(data: bytes) -> Any:
    """``data`` as JSON; 400 if it is not JSON or nests too deep (``bounded_json``)."""
    try:
        return bounded_json.loads(data)
    except bounded_json.BadJSON as exc:
        raise HTTPFailure(400, f"the body is {exc}", "invalid_json") from exc


async def read_json(request: HTTPRequest, limit: int) -> Any:
    """The request body as JSON: 413 past ``limit`` bytes, 400 if it is not JSON we take."""
    return parse_json(await read_body(request, limit))


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPFailure(400, "the body must be a JSON object", "invalid_request")
    return body


def guarded(config: GatewayConfig, *, public: bool = False) -> Callable[[Handler], Handler]:
    """A route with bearer-token checking (unless ``public``) and errors as answers,
    in the shape of the API the path belongs to (``errors.error_body``)."""

    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        async def route(request: HTTPRequest) -> Response:
            path = request.url.path  # KServe v2's paths answer errors in its own shape
            try:
                if not public and config.token is not None:
                    authorize(request, config.token)
                return await handler(request)
            except HTTPFailure as exc:
                return error_response(exc.status, exc.message, exc.code, path=path)
            except SwarmError as exc:
                return swarm_error_response(exc, path=path)
            except Exception:
                log.exception("the gateway failed on %s %s", request.method, path)
                message = "the gateway failed; see the node's log"
                return error_response(500, message, "internal", path=path)

        return route

    return wrap


def authorize(request: HTTPRequest, token: str) -> None:
    """HTTPFailure 401 unless the request carries ``Authorization: Bearer <token>`` or,
    as Anthropic's clients send their key, ``x-api-key: <token>``."""
    if not has_token(request.headers.get, token):
        message = "this gateway needs 'Authorization: Bearer <token>' (or 'x-api-key: <token>')"
        raise HTTPFailure(401, message, "unauthorized")


def has_token(header: Callable[[str], str | None], token: str) -> bool:
    """Whether ``header(name)`` (lower-case names) gives ``token`` as ``authorization:
    Bearer <token>`` or ``x-api-key: <token>``: HTTP headers or gRPC metadata."""
    scheme, _, given = (header("authorization") or "").partition(" ")
    if scheme.lower() != "bearer":
        given = header(API_KEY_HEADER) or ""
    return hmac.compare_digest(given.strip().encode(), token.encode())
