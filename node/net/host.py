"""The libp2p host, built the one way that holds in py-libp2p 0.8.1.

Noise only (the default also offers plaintext, and a plaintext peer got an
answer), yamux only, one connection per peer (otherwise every dial waits
250 ms for happy eyeballs), and on exit the host is closed under a shield,
because leaving ``host.run`` alone leaves the TCP listener open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import psutil
import trio
from libp2p import generate_new_ed25519_identity, new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import load_identity, save_identity
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
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


def peer_id_of(key_pair: Any) -> str:
    """The peer id (base58) a host with ``key_pair`` has."""
    return str(ID.from_pubkey(key_pair.public_key).to_base58())


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
    addrs = check_listen(listen)
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


def check_listen(listen: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """``listen`` parsed; a ConfigError for bad text or a port another process holds.

    The daemon calls it before loading its models too: a port conflict should
    stop it at once, not after a minute of model conversion.
    """
    try:
        addrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:  # multiaddr raises several types for bad text
        raise ConfigError(f"bad listen address in {list(listen)}: {exc}") from exc
    for addr in addrs:
        _refuse_a_held_port(addr)
    return addrs


def _refuse_a_held_port(addr: multiaddr.Multiaddr) -> None:
    """A ConfigError when another socket listens on ``addr``'s TCP port already.

    py-libp2p's listener sets SO_REUSEPORT (hole punching dials out from the
    listen port), so a second node on the same port would start without error and
    the kernel would split inbound connections between the two: dialers then see
    Noise handshakes fail. A probe bound without SO_REUSEPORT is refused while any
    listener holds the port, whatever options that one set.
    """
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols:
        return
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return  # the kernel picks a free one
    family, ip = (
        (socket.AF_INET6, addr.value_for_protocol("ip6"))
        if "ip6" in protocols
        else (socket.AF_INET, addr.value_for_protocol("ip4"))
    )
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port left in TIME_WAIT by a node that just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not ours to judge (no such address): libp2p's listen says
            raise ConfigError(
                f"cannot listen on {addr}: port {port} is held by {_holder(port)} "
                "(another swarm daemon?); stop it or pick another --listen port"
            ) from None


def _holder(port: int) -> str:
    """Who listens on TCP ``port``, as well as this process may tell."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    break
                try:
                    name = " ".join(psutil.Process(conn.pid).cmdline()[:3]) or "?"
                except psutil.Error:
                    name = "?"
                return f"process {conn.pid} ({name})"
    except psutil.Error:
        pass
    return "another process"
