"""The daemon's local socket: a CLI on the daemon's machine reaches it without libp2p.

Over libp2p every ``swarm submit`` builds a host and runs a Noise handshake;
here it connects to a Unix socket and sends its request.

Where. ``DATA_DIR/daemon.sock``, mode 0600, in the data dir (0700 when the
daemon made it); its path is in daemon.json. The daemon removes it at stop; a
stale one (its daemon was killed) is replaced at start, while one that answers
(another daemon runs on this data dir, under the same identity) refuses the
start. A path longer than ``sun_path`` holds (107 bytes on Linux) is bound and
reached as ``/proc/self/fd/N/daemon.sock``, N a descriptor of the data dir;
where even that fails, or the kernel cannot name the connecting user, the
daemon serves no socket (daemon.json says null) and the CLI uses libp2p.

Who. The kernel names the connecting process's user (SO_PEERCRED): the
daemon's own user and root may connect, anyone else is answered UNAUTHORIZED.
A connection is attributed to the data dir's client identity, the peer id of
``client.key`` that the CLI uses over libp2p, so the allow-list and whatever
else is keyed by peer id treat it exactly as that client.

What. Our framing (4-byte length, one msgpack map; the node's Limits). The first
frame is a hello, ``{"t": "hello", "v": 1, "want": SERVICE}``; the connection
is then that service's stream (the daemon names them: ``infer`` for
/swarm/infer exchanges, ``view`` for the record a client reads). A bad hello is
answered MALFORMED (TOO_LARGE when over ``HELLO_MAX``), an unknown service or
version BAD_REQUEST, and the connection is closed; the daemon serves on.

Bounds. At most ``max_connections`` at once (the rest wait in the listen
backlog), a hello within ``HELLO_TIMEOUT_S``; an idle ``infer`` stream is the
serving side's to close (``InferHandler.serve``'s ``idle_timeout_s``).

Nothing here imports libp2p: the CLI's side, ``connect``, lives here too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from node.errors import ConnectionLost, PeerUnavailable
from protocols import (
    DEFAULT_LIMITS,
    Error,
    ErrorCode,
    FrameTooLarge,
    Limits,
    ProtocolError,
    RemoteProtocolError,
    encode,
)
from protocols.errors import ConfigError

from .frames import READ_SIZE, SocketFramed

log = logging.getLogger(__name__)

VERSION = 1
HELLO_MAX = 256  # payload bytes of a hello frame
HELLO_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 60.0  # an infer stream with nothing running and nothing said
MAX_CONNECTIONS = 64
BACKLOG = 128
CONNECT_TIMEOUT_S = 2.0
REFUSE_DRAIN_S = 1.0  # reading what a refused client already sent, so it reads our answer
SUN_PATH_MAX = 107  # bytes of a socket path, without the NUL (Linux; macOS: 103)
_HEADER = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid

Handler = Callable[[SocketFramed, str], Awaitable[None]]


# --- the hello, sans-IO -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    want: str


def hello_frame(want: str, version: int = VERSION) -> bytes:
    """The first frame a client sends: which service it wants."""
    payload = bytes(msgpack.packb({"t": "hello", "v": version, "want": want}, use_bin_type=True))
    return _HEADER.pack(len(payload)) + payload


def take_hello(buf: bytes | bytearray) -> tuple[Hello, bytes] | None:
    """The hello at the start of ``buf`` and the bytes after it; None until it is whole.

    Raises RemoteProtocolError (MALFORMED) for anything but a hello, FrameTooLarge
    for a frame longer than ``HELLO_MAX``. Any bytes give one of the three.
    """
    if len(buf) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack_from(buf)
    if length > HELLO_MAX:
        raise FrameTooLarge(f"a hello of {length} bytes exceeds {HELLO_MAX}")
    if length == 0:
        raise RemoteProtocolError("empty frame")
    end = _HEADER.size + length
    if len(buf) < end:
        return None
    try:
        body = msgpack.unpackb(bytes(buf[_HEADER.size : end]), raw=False, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
        raise RemoteProtocolError("the hello is not a msgpack map") from exc
    if not isinstance(body, dict) or body.get("t") != "hello":
        raise RemoteProtocolError("the first frame must be a hello")
    version, want = body.get("v"), body.get("want")
    if type(version) is not int or not isinstance(want, str) or len(want) > 64:
        raise RemoteProtocolError("a hello has an int 'v' and a short str 'want'")
    return Hello(version, want), bytes(buf[end:])


# --- addresses ----------------------------------------------------------------------------


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """The name to bind or connect ``path`` by: itself, or when too long for
    ``sun_path``, the same file reached through a descriptor of its directory."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def _connect(sock: trio.socket.SocketType, path: Path) -> None:
    with _address(path) as address:
        await sock.connect(address)


def _peer_uid(sock: trio.socket.SocketType) -> int:
    _pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return int(uid)


# --- the daemon's side --------------------------------------------------------------------


class LocalSocket:
    """Serves ``handlers`` (service name -> handler of a stream and its peer id) on
    the Unix socket at ``path``, each connection attributed to ``peer_id``."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        peer_id: str,
        limits: Limits = DEFAULT_LIMITS,
        max_connections: int = MAX_CONNECTIONS,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.peer_id = peer_id
        self._handlers = dict(handlers)
        self._limits = limits
        self._slots = trio.Semaphore(max_connections)
        self._hello_timeout_s = hello_timeout_s
        self.connections = 0  # accepted so far
        self.refused_users = 0  # connections from another user
        self._warned_uids: set[int] = set()  # each logged once (a bounded few)

    async def run(self, *, task_status: TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; the socket file is removed on the way out.

        Started with the path it listens on, or None when this machine gives no
        socket (logged; the CLI then uses libp2p). Raises ConfigError when another
        daemon answers on ``path``.
        """
        if not hasattr(socket, "SO_PEERCRED"):
            log.info("local socket: this system cannot name a socket's peer; none served")
            task_status.started(None)
            return
        try:
            sock, identity = await self._bind()
        except OSError as exc:
            log.warning("local socket: cannot bind %s (%s); the CLI uses libp2p", self.path, exc)
            task_status.started(None)
            return
        try:
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    await self._slots.acquire()
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # out of descriptors: wait, as trio.serve_listeners
                        self._slots.release()
                        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                            raise
                        log.warning("local socket: accept failed (%s); retrying", exc)
                        await trio.sleep(0.1)
                        continue
                    self.connections += 1
                    nursery.start_soon(self._connection, stream)
        finally:
            sock.close()
            self._remove(identity)

    async def _bind(self) -> tuple[trio.socket.SocketType, tuple[int, int]]:
        """A listening socket at ``path`` (0600), and the file's (device, inode)."""
        await self._clear_stale()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(self.path) as address:
                await sock.bind(address)
            os.chmod(self.path, 0o600)
            sock.listen(BACKLOG)
            st = os.lstat(self.path)
        except BaseException:
            sock.close()
            raise
        return sock, (st.st_dev, st.st_ino)

    async def _clear_stale(self) -> None:
        """Remove a socket left by a daemon that died; refuse when one still answers."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await _connect(probe, self.path)
            except (OSError, trio.TooSlowError):
                log.info("local socket: replacing the stale %s", self.path)
                self.path.unlink(missing_ok=True)
                return
        raise ConfigError(
            f"another daemon serves the data dir {self.path.parent} (its socket answers); "
            "stop it first, or give this one its own --data-dir"
        )

    def _remove(self, identity: tuple[int, int]) -> None:
        """Unlink the socket file if it is still the one we bound (not a successor's)."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == identity:
                self.path.unlink()

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        except (ConnectionLost, ProtocolError, trio.TooSlowError) as exc:
            log.debug("local socket: a connection ended: %s", exc)
        except Exception:  # a bug in one connection must not take the daemon down
            log.exception("local socket: a connection failed")
        finally:
            await trio.aclose_forcefully(stream)
            self._slots.release()

    async def _serve(self, stream: trio.SocketStream) -> None:
        uid = _peer_uid(stream.socket)
        if uid not in (os.geteuid(), 0):
            self.refused_users += 1
            if uid not in self._warned_uids and len(self._warned_uids) < MAX_CONNECTIONS:
                self._warned_uids.add(uid)
                log.warning("local socket: refused uid %d (only this user and root)", uid)
            await _refuse(stream, ErrorCode.UNAUTHORIZED, "this daemon serves its own user only")
            return
        buffered = bytearray()
        try:
            with trio.move_on_after(self._hello_timeout_s) as waiting:
                while (taken := take_hello(buffered)) is None:  # at most HELLO_MAX + 4 bytes
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        return  # it hung up before saying anything
                    buffered += data
        except RemoteProtocolError as exc:
            await _refuse(stream, exc.code, str(exc))
            return
        if waiting.cancelled_caught:
            log.debug("local socket: no hello within %s s", self._hello_timeout_s)
            return
        hello, rest = taken
        handler = self._handlers.get(hello.want)
        if hello.version != VERSION or handler is None:
            services = ", ".join(sorted(self._handlers))
            message = f"this socket speaks hello version {VERSION} with a service of: {services}"
            await _refuse(stream, ErrorCode.BAD_REQUEST, message)
            return
        await handler(SocketFramed(stream, self.peer_id, self._limits, buffered=rest), self.peer_id)


async def _refuse(stream: trio.SocketStream, code: ErrorCode, message: str) -> None:
    """Answer with a typed Error and end the connection, reading (for a bounded time)
    what the client had already sent: closing on unread bytes would reset it."""
    with (
        trio.move_on_after(REFUSE_DRAIN_S),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        for frame in encode(Error("", code, message)):
            await stream.send_all(frame)
        await stream.send_eof()
        while await stream.receive_some(READ_SIZE):
            pass


# --- the client's side --------------------------------------------------------------------


async def connect(
    path: Path,
    want: str,
    *,
    peer_id: str = "the local daemon",
    limits: Limits = DEFAULT_LIMITS,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> SocketFramed:
    """A stream to the ``want`` service of the daemon listening at ``path``.

    ``peer_id`` names the daemon in errors. Raises PeerUnavailable when nothing
    answers there (nothing was sent: trying another way is safe).
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(timeout_s):
            await _connect(sock, path)
            stream = trio.SocketStream(sock)
            await stream.send_all(hello_frame(want))
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        sock.close()
        raise PeerUnavailable(f"no daemon answers on {path}: {exc}") from exc
    return SocketFramed(stream, peer_id, limits)
