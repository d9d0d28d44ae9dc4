"""The libp2p host, built the one way that holds in py-libp2p 0.8.1.

Noise only (the default also offers plaintext, and a plaintext peer got an
answer), yamux only, one connection per peer (otherwise every dial waits
250 ms for happy eyeballs), and on exit the host is closed under a shield,
because leaving ``host.run`` alone leaves the TCP listener open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity, new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import load_identity, save_identity
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.errors import sole_error
from protocols.errors import ConfigError

log = logging.getLogger(__name__)
HOST_CLOSE_TIMEOUT_S = 5.0
NEGOTIATE_TIMEOUT_S = 10


def load_or_create_identity(path: Path) -> Any:
    """The node's key pair: the same peer id across restarts."""
    if path.exists():
        try:
            return load_identity(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the identity in {path}: {exc}") from exc
    key_pair = generate_new_ed25519_identity()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_identity(key_pair, path)  # written 0600 by libp2p
    log.info("created a new identity in %s", path)
    return key_pair


def build_host(key_pair: Any | None = None, *, psk: str | None = None) -> Any:
    """A host; with ``psk`` (64 hex digits) every connection is a private-swarm one."""
    key_pair = key_pair or generate_new_ed25519_identity()
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_ID): noise},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        psk=psk,
        # A peer with the wrong swarm key never finishes the handshake: give up sooner
        # than the default (a wrong key otherwise takes ~40 s to fail).
        negotiate_timeout=NEGOTIATE_TIMEOUT_S,
    )


@asynccontextmanager
async def running_host(
    key_pair: Any | None, listen: Sequence[str], *, psk: str | None = None
) -> AsyncIterator[Any]:
    """A started host listening on ``listen``; closed, listener included, on exit."""
    try:
        addrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:  # multiaddr raises several types for bad text
        raise ConfigError(f"bad listen address in {list(listen)}: {exc}") from exc
    host = build_host(key_pair, psk=psk)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(host.run(listen_addrs=addrs))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {list(listen)}: {exc}") from exc
            try:
                yield host
            finally:
                # Close inside run(): once run() exits, its service teardown drops the
                # connections without closing their sockets, and the listener stays open.
                with trio.CancelScope(shield=True), trio.move_on_after(HOST_CLOSE_TIMEOUT_S):
                    await host.close()
    except BaseExceptionGroup as group:
        # libp2p's nurseries wrap an error raised in our body; give the caller the error.
        error = sole_error(group)
        if error is group:
            raise
        raise error from None
