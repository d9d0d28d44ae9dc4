"""The CLI's client for the daemon of its own data dir, over that daemon's local socket.

The same calls as ``node.client.SwarmClient`` (``infer``, ``record``) without
libp2p: no host to build, no handshake, no libp2p import (node.net.local says
who may connect and as whom). ``Client`` is what the commands need of either.

    async with LocalClient.connect(Path(state["socket"])) as client:
        result = await client.infer("echo", {"text": "hi"})

A call raises PeerUnavailable when nothing answers on the socket; nothing was
sent then, so the CLI tries libp2p instead. Calls on one client run one at a
time; the infer connection is kept for the next call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from node.errors import ConnectionLost
from node.jobs.call import DEADLINE_GRACE_S, OnChunk, client_request, exchange
from node.net import local
from node.net.frames import SocketFramed
from protocols import (
    DEFAULT_LIMITS,
    CapabilityRecord,
    Error,
    Limits,
    Param,
    Priority,
    RemoteError,
    RemoteProtocolError,
    Result,
    Value,
)

if TYPE_CHECKING:
    import numpy as np

# Put in a record's body by its signer (capabilities.signing.ISSUED_KEY); a verified
# record's body comes without it, and so does ours.
ISSUED_KEY = "issued_ms"
VIEW_TIMEOUT_S = 10.0


class Record(Protocol):
    """What the commands read of a node's record: a VerifiedRecord, or ours."""

    @property
    def peer_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def body(self) -> Mapping[str, Any]: ...


class Client(Protocol):
    """What the commands need of a client: ``SwarmClient`` or ``LocalClient``."""

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Value | np.ndarray[Any, Any]],
        *,
        params: Mapping[str, Param] | None = None,
        priority: Priority = Priority.NORMAL,
        deadline_s: float | None = None,
        on_chunk: OnChunk | None = None,
        request_id: str | None = None,
        strategy: str | None = None,
        verify: int = 0,
    ) -> Result: ...

    async def record(self) -> Record: ...


@dataclass(frozen=True, slots=True)
class LocalRecord:
    """The daemon's record for clients, as read off its socket: the same peer id, seq
    and body a verified record of it has (the socket's permissions vouch for it,
    so its signature is not checked)."""

    peer_id: str
    seq: int
    body: Mapping[str, Any]


class LocalClient:
    def __init__(
        self, path: Path, *, peer_id: str = "the local daemon", limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.path = path
        self.peer_id = peer_id  # the daemon's, for error messages
        self._limits = limits
        self._infer: SocketFramed | None = None
        self._lock = trio.Lock()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, path: Path, *, peer_id: str = "the local daemon", limits: Limits = DEFAULT_LIMITS
    ) -> AsyncIterator[LocalClient]:
        """A client of the daemon listening at ``path``; its connections close on exit."""
        client = cls(path, peer_id=peer_id, limits=limits)
        try:
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        if self._infer is not None:
            await self._infer.close()
            self._infer = None

    async def _open(self, want: str) -> SocketFramed:
        return await local.connect(self.path, want, peer_id=self.peer_id, limits=self._limits)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Value | np.ndarray[Any, Any]],
        *,
        params: Mapping[str, Param] | None = None,
        priority: Priority = Priority.NORMAL,
        deadline_s: float | None = None,
        on_chunk: OnChunk | None = None,
        request_id: str | None = None,
        strategy: str | None = None,
        verify: int = 0,
    ) -> Result:
        """As ``SwarmClient.infer``: run ``model`` through the local daemon. Raises
        RemoteError for the daemon's typed answer, PeerUnavailable when the socket
        does not answer (nothing sent), ConnectionLost when it broke afterwards."""
        request = client_request(
            model,
            inputs,
            params=params,
            priority=priority,
            deadline_s=deadline_s,
            stream=on_chunk is not None,
            request_id=request_id,
            strategy=strategy,
            verify=verify,
        )
        async with self._lock:
            if self._infer is None or self._infer.closed:
                self._infer = await self._open("infer")
            stream, clean = self._infer, False
            try:
                with trio.fail_after(
                    float("inf") if deadline_s is None else deadline_s + DEADLINE_GRACE_S
                ):
                    result = await exchange(stream, request, on_chunk)
                clean = True
                return result
            except RemoteError:
                clean = True
                raise
            finally:
                if not clean:  # cancelled or broken: a late answer must not reach a next call
                    await stream.close()
                    self._infer = None

    async def record(self) -> LocalRecord:
        """The daemon's record for clients: hardware, models, load, its view of the swarm.

        Raises RemoteError (UNAUTHORIZED when its allow-list leaves us out),
        PeerUnavailable when the socket does not answer.
        """
        stream = await self._open("view")
        try:
            with trio.fail_after(VIEW_TIMEOUT_S):
                message = await stream.receive()
        finally:
            await stream.close()
        if isinstance(message, Error):
            raise RemoteError(message.code, message.message, retry_after_ms=message.retry_after_ms)
        if not isinstance(message, CapabilityRecord):
            if message is None:
                raise ConnectionLost(f"{self.peer_id} closed its socket without answering")
            raise RemoteProtocolError(f"expected a record, got {type(message).__name__}")
        body = {k: v for k, v in message.body.items() if k != ISSUED_KEY}
        return LocalRecord(message.peer_id, message.seq, body)
