"""The KServe v2 gRPC port: grpcio's server on threads of its own, the work on trio's.

grpcio serves on a thread pool and calls each handler on one of its threads;
it has no trio flavour (grpc.aio is asyncio's). So a handler never touches the
node itself: it decodes the request there (``grpc_codec``, pure), then hands
the node's part to the trio loop with ``trio.from_thread.run`` and the loop's
token, and blocks its own thread, never trio's, until the answer comes; the
answer is encoded on its thread too. ``Bridge`` does that hand-over. On the
trio side each call runs in a cancel scope the bridge holds: a client that
cancels, or whose deadline passes, has its job cancelled (grpcio's RPC
termination callback posts the cancel to the loop with ``run_sync_soon``), and
when the node stops, what is left is cancelled the same way. grpc's deadline
becomes the swarm request's ``deadline_ms``, so the swarm stops it in time too.

At most ``workers`` calls run at once, each holding one of grpcio's threads,
and ``MAX_QUEUED_SHARE`` times as many more wait; past that grpcio answers
RESOURCE_EXHAUSTED itself. Messages over ``max_message`` bytes are refused by
grpcio before they are read.

Auth is HTTP's (``app.has_token``): ``authorization: Bearer <token>`` or
``x-api-key`` metadata on every call but ServerLive, ServerReady and
ServerMetadata, which say nothing of the swarm. ``x-swarm-deadline-ms``,
``x-swarm-priority`` and ``x-swarm-verify`` metadata are HTTP's headers of those
names, and a verified job's verdict comes back as trailing metadata named as
HTTP's response headers (``x-swarm-verify-verdict`` ...).

The server lives in the daemon's nursery (``GrpcGateway.run``): when the node
begins to stop, it refuses new calls and gives those in flight the grace period
(``server.stop(grace)``); the nursery's cancellation cancels what is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import grpc
import trio
from trio_typing import TaskStatus

from protocols import ErrorCode, Request, Result, SwarmError

from . import grpc_codec as codec
from .app import (
    MAX_DEADLINE_MS,
    Backend,
    find_model,
    has_token,
    new_id,
    no_chunks,
    options_from,
    verify_headers,
)
from .config import MAX_QUEUED_SHARE, GrpcConfig, is_loopback
from .errors import HTTPFailure
from .grpc_codec import Refused
from .kserve import VERSION
from .proto import kserve_v2_grpc_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = "inference.GRPCInferenceService"  # the specification's full name: the calls' paths
SERVER_NAME = "swarm"
FINAL_GRACE_S = 1.0  # for calls to send their answers once the loop's part of them is over
STOP_WAIT_S = 5.0  # for grpcio's threads to end once every call is cancelled
STOP_POLL_S = 0.05


class Stopping(SwarmError):
    """A call that reached the loop as the port stopped: it did not run."""

    code = ErrorCode.NOT_EXECUTED


class ClientGone(SwarmError):
    """The client cancelled the call, or its deadline passed: its job was stopped."""

    code = ErrorCode.CANCELLED


@dataclass(slots=True, eq=False)  # by identity: held in a set
class _Pending:
    """One call's place on the trio side; touched on the trio thread only."""

    scope: trio.CancelScope | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class Bridge:
    """Runs work of grpcio's threads on the trio loop whose token it holds."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.pending: set[_Pending] = set()
        self.closed = False  # trio thread only

    def call(self, context: Any, work: Callable[[], Awaitable[T]]) -> T:
        """``await work()`` on the loop, from a grpcio thread; cancelled with the RPC."""
        pending = _Pending()

        def cancel() -> None:  # on whichever thread ends the RPC
            with contextlib.suppress(trio.RunFinishedError):  # the loop is gone already
                self.token.run_sync_soon(pending.cancel)

        context.add_callback(cancel)
        try:
            done: T = trio.from_thread.run(self._run, pending, work, trio_token=self.token)
            return done
        except (trio.RunFinishedError, trio.Cancelled) as exc:
            raise Stopping("the node stopped") from exc

    def sync(self, work: Callable[[], T]) -> T:
        """``work()`` on the loop (it reads the node's state), from a grpcio thread."""
        try:
            return trio.from_thread.run_sync(work, trio_token=self.token)
        except trio.RunFinishedError as exc:
            raise Stopping("the node stopped") from exc

    async def _run(self, pending: _Pending, work: Callable[[], Awaitable[T]]) -> T:
        if self.closed:
            raise Stopping("the node is stopping")
        with trio.CancelScope() as pending.scope:
            if pending.cancelled:
                pending.scope.cancel()
            self.pending.add(pending)
            try:
                return await work()
            finally:
                self.pending.discard(pending)
        if self.closed:
            raise Stopping("the node stopped before the call was answered")
        raise ClientGone("the call ended before its answer")  # nobody reads it: the RPC is over

    def close(self) -> None:
        """Cancel every call still running (trio thread)."""
        self.closed = True
        for pending in list(self.pending):
            pending.cancel()


class GrpcGateway:
    """The KServe v2 gRPC port; ``address`` is set once it listens."""

    def __init__(
        self,
        backend: Backend,
        config: GrpcConfig,
        *,
        shutdown: Callable[[], Awaitable[Any]],
        grace_s: float = 10.0,
    ) -> None:
        self.backend = backend
        self.config = config
        self.shutdown = shutdown
        self.grace_s = grace_s
        self.address = ""  # HOST:PORT

    async def run(self, *, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the node stops; OSError if the port cannot be bound."""
        cfg = self.config
        bridge = Bridge(trio.lowlevel.current_trio_token())
        server = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="grpc-v2"),
            handlers=[handlers(self.backend, cfg, bridge)],
            maximum_concurrent_rpcs=cfg.workers * (1 + MAX_QUEUED_SHARE),
            options=[
                ("grpc.max_receive_message_length", cfg.max_message),
                ("grpc.max_send_message_length", -1),  # answers are bounded by the swarm's
                ("grpc.so_reuseport", 0),  # a port another server holds is busy, not shared
            ],
        )
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        port = await trio.to_thread.run_sync(_bind, server, host, cfg.port)
        try:
            await trio.to_thread.run_sync(server.start)
            self.address = f"{host}:{port}"
            if not is_loopback(cfg.host):
                guard = "a bearer token" if cfg.token else "NO token (--grpc-insecure)"
                log.warning("gRPC port on %s beyond loopback, guarded by %s", self.address, guard)
            log.info("KServe v2 gRPC on %s", self.address)
            task_status.started(self.address)
            await self.shutdown()
            # New calls are refused now; those in flight have the grace period, and the
            # nursery's cancellation (after the service drained) ends the rest below.
            await _stopped(server.stop(self.grace_s))
        finally:
            with trio.CancelScope(shield=True):
                # What still runs on the loop ends now, and its call answers (UNAVAILABLE);
                # a call whose job is done sends its answer. grpcio aborts what is left
                # after FINAL_GRACE_S (the shortest grace it was given wins).
                bridge.close()
                with trio.move_on_after(STOP_WAIT_S):
                    await _stopped(server.stop(FINAL_GRACE_S))


async def _stopped(event: threading.Event) -> None:
    """Until grpcio has stopped (``server.stop``'s event), polled: no thread waits on it."""
    while not event.is_set():  # noqa: ASYNC110 (a threading.Event: trio cannot wait on it)
        await trio.sleep(STOP_POLL_S)


def _bind(server: Any, host: str, port: int) -> int:
    """Bind ``host:port`` (0: any free port); the port bound. grpcio says only that it
    failed, so a failure is retried on a plain socket to learn the OSError."""
    try:
        return int(server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError as exc:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host.strip("[]"), port))  # raises the OSError grpcio did not show
        raise OSError(errno.EADDRNOTAVAIL, f"gRPC port: cannot bind {host}:{port}") from exc


def handlers(backend: Backend, config: GrpcConfig, bridge: Bridge) -> Any:
    """The six calls of ``SERVICE`` as grpcio handlers."""

    def live(request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ready(request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def server_metadata(
        request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_version())

    def described(name: str) -> Mapping[str, Any]:
        return bridge.sync(lambda: find_model(backend, name))

    def model_ready(request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        # Not an error for a model nobody serves: it is not ready, which is the question.
        models = bridge.sync(backend.models)
        found = models.get(request.name.casefold()) if request.name else None
        version_ok = request.version in ("", VERSION)
        return pb.ModelReadyResponse(ready=found is not None and version_ok)

    def model_metadata(request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = described(request.name)
        codec.check_version(model, request.version)
        return codec.model_metadata(model)

    def infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        call = codec.read_request(request)  # on this thread: the trio loop never decodes
        how = options_from(_metadata(context).get)
        deadline_ms = how.deadline_ms
        remaining = context.time_remaining()  # without a deadline: None, or about forever
        if remaining is not None and remaining * 1000 < MAX_DEADLINE_MS:
            left = max(1, int(remaining * 1000))
            deadline_ms = left if deadline_ms is None else min(deadline_ms, left)

        async def run() -> tuple[str, Result]:
            # One trip to the loop: the model looked up and the job run there.
            model = find_model(backend, call.model)
            codec.check_version(model, call.version)
            codec.check_wanted(model, call.wanted)
            job = Request(
                id=call.id if 0 < len(call.id) <= 128 else new_id("grpc"),
                model=str(model["name"]),
                inputs=call.inputs,
                params=call.params,
                deadline_ms=deadline_ms,
                priority=how.priority,
                verify=how.verify,
                hedge_ms=how.hedge_ms,
            )
            return job.model, await backend.execute(job, no_chunks)

        name, result = bridge.call(context, run)
        answer = codec.infer_response(call, name, result.outputs)
        if verified := verify_headers([result.meta]):  # how the copies compared, if asked
            context.set_trailing_metadata(tuple(verified.items()))
        return answer

    calls: dict[str, tuple[Callable[[Any, Any], Any], Any, bool]] = {
        "ServerLive": (live, pb.ServerLiveRequest, True),
        "ServerReady": (ready, pb.ServerReadyRequest, True),
        "ServerMetadata": (server_metadata, pb.ServerMetadataRequest, True),
        "ModelReady": (model_ready, pb.ModelReadyRequest, False),
        "ModelMetadata": (model_metadata, pb.ModelMetadataRequest, False),
        "ModelInfer": (infer, pb.ModelInferRequest, False),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                _guarded(handler, config, public=public, name=name),
                request_deserializer=message.FromString,
                response_serializer=lambda answer: answer.SerializeToString(),
            )
            for name, (handler, message, public) in calls.items()
        },
    )


def _guarded(
    handler: Callable[[Any, Any], T], config: GrpcConfig, *, public: bool, name: str
) -> Callable[[Any, Any], T]:
    """``handler`` with the token checked (unless ``public``) and every failure as a
    status: ours with their message, anything else INTERNAL without its internals."""

    def call(request: Any, context: Any) -> T:
        try:
            token = None if public else config.token
            if token is not None and not has_token(_metadata(context).get, token):
                message = "this port needs 'authorization: Bearer <token>' metadata"
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, message)
            return handler(request, context)
        except Refused as exc:
            refused = exc
        except (SwarmError, HTTPFailure) as exc:
            refused = codec.status_of(exc)
        except Exception:
            log.exception("the gRPC port failed on %s", name)
            refused = Refused(grpc.StatusCode.INTERNAL, "the gateway failed; see the node's log")
        if refused.metadata:
            context.set_trailing_metadata(refused.metadata)
        context.abort(refused.status, refused.message)
        raise AssertionError("context.abort returned")  # it raises, always

    return call


def _version() -> str:
    try:
        return metadata.version("swarm-node")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _metadata(context: Any) -> dict[str, str]:
    """The call's metadata by (lower-case) key; binary values left out."""
    return {
        key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
    }
