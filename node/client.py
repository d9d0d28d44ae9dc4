"""A client that programs use to submit work to a swarm node.

    async with SwarmClient.connect("/ip4/127.0.0.1/tcp/7420/p2p/12D3Koo...") as client:
        result = await client.infer("all-minilm-l6-v2", {"text": ["hello", "world"]})
        vectors = result.outputs["embedding"].numpy()

or, outside trio, ``submit(address, model, inputs)``. The client runs its own
short-lived libp2p host with a fresh identity; numpy arrays in ``inputs`` are
sent as tensors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio
from libp2p import generate_new_ed25519_identity

from bootstrap.addrs import peer_info
from capabilities.signing import VerifiedRecord
from node.errors import PeerUnavailable
from node.jobs.call import DEADLINE_GRACE_S, client_request
from node.jobs.call import new_request_id as new_request_id
from node.jobs.outbound import Caller, OnChunk
from node.membership.caps import RecordSigner, exchange_records
from node.net.host import running_host
from protocols import DEFAULT_LIMITS, Limits, Param, Priority, Result, Value

CONNECT_TIMEOUT_S = 10.0


class SwarmClient:
    def __init__(self, host: Any, peer: Any, caller: Caller, key_pair: Any) -> None:
        self._host = host
        self._key_pair = key_pair
        self.peer = peer
        self._caller = caller

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
        swarm_key: str | None = None,
        key_pair: Any | None = None,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> AsyncIterator[SwarmClient]:
        """Dial the node at ``address`` (a multiaddr ending in /p2p/<peer id>).

        ``swarm_key`` joins a private swarm; ``key_pair`` is the identity to use
        (a node's own, to pass its allow-list), else a fresh one.
        """
        info = peer_info(address)
        key_pair = key_pair or generate_new_ed25519_identity()
        async with running_host(key_pair, (), psk=swarm_key) as host:
            try:
                with trio.fail_after(timeout_s):
                    await host.connect(info)
            except trio.TooSlowError as exc:
                raise PeerUnavailable(
                    f"no handshake with {address} in {timeout_s} s (wrong swarm key?)"
                ) from exc
            except Exception as exc:  # libp2p raises many types for a failed dial
                raise PeerUnavailable(f"cannot connect to {address}: {exc}") from exc
            caller = Caller(host, limits=limits)
            try:
                yield cls(host, info.peer_id, caller, key_pair)
            finally:
                await caller.close()

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
        hedge_ms: int | None = None,
        idempotent: bool = True,
    ) -> Result:
        """Run ``model`` on ``inputs`` somewhere in the swarm, through this node.

        With ``on_chunk`` the request streams: chunks arrive as produced and the
        Result carries only metadata. ``strategy`` (a ``node.router.Strategy``
        value) picks how the node chooses the peer; the Result's meta says who
        served it and after how many attempts. ``verify`` N runs it on N more nodes:
        the meta then says whether their answers agreed (``verify_verdict``,
        ``verify_agreed``, ``verify_nodes``; see ``node.jobs.verify``). Raises
        RemoteError (with its ``code`` and ``retry``) when the node answers with an error.
        ``hedge_ms``: with no first chunk or answer in that time the node sends the job
        to a second peer too (0: never; None: the node's default); only for an
        ``idempotent`` job (one safe to run twice; inference is).
        """
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
            hedge_ms=hedge_ms,
            idempotent=idempotent,
        )
        if deadline_s is None:
            return await self._caller.call(self.peer, request, on_chunk)
        # Stop waiting a little after the node's own deadline, so its typed error wins.
        with trio.fail_after(deadline_s + DEADLINE_GRACE_S):
            return await self._caller.call(self.peer, request, on_chunk)

    async def record(self) -> VerifiedRecord:
        """The node's verified record: hardware, models, and its view of the swarm."""
        hello = RecordSigner(self._key_pair, dict).heartbeat(0, {}, client=True)
        return (await exchange_records(self._host, self.peer, hello)).record


def submit(address: str, model: str, inputs: Mapping[str, Any], **options: Any) -> Result:
    """Blocking convenience: connect, run one request, disconnect."""

    async def once() -> Result:
        async with SwarmClient.connect(address) as client:
            return await client.infer(model, inputs, **options)

    return trio.run(once)
