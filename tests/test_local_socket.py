"""The daemon's local socket, with real nodes in one process: the same answers as
libp2p gives the same client, the same allow-list, typed errors for bad bytes,
other users refused, and the socket file's life (made, replaced when stale, gone
at stop). The CLI through it, as processes: test_cli_local_processes.py."""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import pytest
import trio
from conftest import NodeFactory
from support import eventually

from node.cli.local_client import LocalClient
from node.client import SwarmClient
from node.daemon import Node
from node.data_dir import CLIENT_KEY, SOCKET_FILE, read_state
from node.errors import PeerUnavailable, sole_error
from node.jobs.inbound import InferHandler
from node.jobs.service import InferenceService
from node.net import local
from node.net.frames import SocketFramed
from node.net.host import load_or_create_identity, peer_id_of
from protocols import (
    Decoder,
    Error,
    ErrorCode,
    FrameTooLarge,
    Message,
    ProtocolError,
    RemoteError,
    Request,
    Result,
    encode,
)
from protocols.errors import ConfigError
from runners.fake import FakeRunner

OTHER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def socket_of(node: Node) -> Path:
    return node.config.data_dir / SOCKET_FILE


def client_id(node: Node) -> str:
    return peer_id_of(load_or_create_identity(node.config.data_dir / CLIENT_KEY))


@asynccontextmanager
async def libp2p_client(node: Node) -> AsyncIterator[SwarmClient]:
    """The client the CLI uses over libp2p: the data dir's client identity."""
    key_pair = load_or_create_identity(node.config.data_dir / CLIENT_KEY)
    async with SwarmClient.connect(node.addrs[0], key_pair=key_pair) as client:
        yield client


@asynccontextmanager
async def raw(path: Path) -> AsyncIterator[trio.SocketStream]:
    """A bare connection to the socket, for bytes no well-behaved client sends."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    async with trio.SocketStream(sock) as stream:
        yield stream


async def answer(stream: trio.SocketStream) -> Message | None:
    """The first message the daemon sends back, or None when it just hangs up."""
    decoder = Decoder()
    with trio.fail_after(10):
        while (message := decoder.next_message()) is None:
            data = await stream.receive_some(65536)
            if not data:
                return None
            decoder.feed(data)
    return message


# --- the same service as over libp2p -------------------------------------------------------


async def test_submit_over_the_socket_equals_submit_over_libp2p(node_factory: NodeFactory) -> None:
    async with (
        node_factory("b", models=("fake:echo",)) as b,
        node_factory("a", models=(), peers=(b.addrs[0],)) as a,  # forwards: served_by is b
    ):
        state = read_state(a.config.data_dir)
        assert state is not None and state["socket"] == str(socket_of(a))
        assert (socket_of(a).stat().st_mode & 0o777) == 0o600
        async with LocalClient.connect(socket_of(a), peer_id=a.peer_id) as client:
            here = await client.infer("echo", {"text": ["a", "b"]})
            again = await client.infer("echo", {"text": "c"})  # the connection is reused
            chunks = []

            async def on_chunk(chunk: object) -> None:
                chunks.append(chunk)

            streamed = await client.infer(
                "echo", {"text": "hi"}, params={"chunks": 3}, on_chunk=on_chunk
            )
        async with libp2p_client(a) as remote:
            there = await remote.infer("echo", {"text": ["a", "b"]})
        at_a, at_b = a.services.service.shares(), b.services.service.shares()
    assert here.outputs == there.outputs
    # Both ways the jobs are the CLI client's at a (one of its own clients, weighed so),
    # and a's at b, which a vouches for.
    [mine] = at_a["peers"]
    assert (mine["peer"], mine["own"], mine["served"]) == (client_id(a), True, 4)
    assert mine["weight"] == a.config.fairness.own_weight
    assert [(r["peer"], r["served"]) for r in at_b["peers"]] == [(a.peer_id, 4)]
    assert here.meta["served_by"] == there.meta["served_by"] == b.peer_id
    assert here.meta["forwarded_by"] == there.meta["forwarded_by"] == a.peer_id
    assert set(here.meta) == set(there.meta)
    assert again.outputs["embedding"] != here.outputs["embedding"]
    assert len(chunks) == 3 and streamed.meta["chunks"] == 3


async def test_the_record_over_the_socket_has_the_libp2p_records_shape(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("b", models=("fake:echo",)) as b,
        node_factory("a", models=("fake:other",), peers=(b.addrs[0],)) as a,
    ):
        async with LocalClient.connect(socket_of(a)) as client:
            here = await client.record()
        async with libp2p_client(a) as remote:
            there = await remote.record()
    assert here.peer_id == there.peer_id == a.peer_id
    assert here.seq < there.seq  # signed in that order, by the same signer
    assert list(here.body) == list(there.body)  # the same keys, in the same order
    assert list(here.body["view"]) == list(there.body["view"])
    assert here.body["models"] == there.body["models"]
    assert [p["peer_id"] for p in here.body["view"]["peers"]] == [b.peer_id]


async def test_errors_come_typed_as_on_the_wire(node_factory: NodeFactory) -> None:
    async with (
        node_factory(models=("fake:echo",)) as node,
        LocalClient.connect(socket_of(node)) as client,
    ):
        with pytest.raises(RemoteError) as raised:
            await client.infer("nobody-serves-this", {"text": "x"})
        assert raised.value.code == ErrorCode.MODEL_NOT_FOUND
        with pytest.raises(RemoteError) as raised:
            await client.infer("echo", {"text": "x"}, params={"fail": "BAD_REQUEST"})
        assert raised.value.code == ErrorCode.BAD_REQUEST
        assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == node.peer_id


async def test_deadline_and_cancel_reach_the_daemon(node_factory: NodeFactory) -> None:
    async with (
        node_factory(models=("fake:slow:3000",)) as node,
        LocalClient.connect(socket_of(node)) as client,
    ):
        with pytest.raises(RemoteError) as raised:
            await client.infer("slow", {"text": "x"}, deadline_s=0.2)
        assert raised.value.code == ErrorCode.DEADLINE_EXCEEDED
        began = trio.current_time()
        with trio.move_on_after(0.3):  # the caller gives up: a Cancel goes to the daemon
            await client.infer("slow", {"text": "x"})
        await eventually(lambda: node.services.service.in_flight == 0, timeout_s=2)
        assert trio.current_time() - began < 2.5  # stopped, not run out (3 s)


# --- who may connect -----------------------------------------------------------------------


async def test_the_allow_list_applies_to_the_local_client(node_factory: NodeFactory) -> None:
    async with node_factory("closed", models=("fake:echo",), allow=frozenset({OTHER_ID})) as node:
        async with LocalClient.connect(socket_of(node)) as client:
            with pytest.raises(RemoteError) as raised:
                await client.infer("echo", {"text": "x"})
            assert raised.value.code == ErrorCode.UNAUTHORIZED
            with pytest.raises(RemoteError) as raised:
                await client.record()
            assert raised.value.code == ErrorCode.UNAUTHORIZED
        # Refused as the data dir's client, the same peer the CLI is over libp2p.
        assert node.access.refused_by_peer == {client_id(node): 2}
        assert node.status()["view"]["access"]["refused"] == 2

    # The same data dir, its client's id allowed: let in.
    allowed = frozenset({OTHER_ID, client_id(node)})
    async with (
        node_factory("closed", models=("fake:echo",), allow=allowed) as node,
        LocalClient.connect(socket_of(node)) as client,
    ):
        assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == node.peer_id
        assert (await client.record()).peer_id == node.peer_id
        assert node.access.refused == 0


def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root; the check is SO_PEERCRED's uid")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the other user's process")
    return pwd.getpwnam("nobody")


OTHER_USER_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect:", exc.errno)
    sys.exit(0)
s.sendall(bytes.fromhex(sys.argv[2]))
data = b""
while chunk := s.recv(65536):
    data += chunk
print("answer:", data.hex())
"""


def as_nobody(path: Path) -> str:
    """Connect to ``path`` from a process running as nobody; what it got."""
    nobody = _nobody()

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    done = subprocess.run(
        ["/usr/bin/python3", "-c", OTHER_USER_CLIENT, str(path), local.hello_frame("infer").hex()],
        preexec_fn=drop,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@contextmanager
def open_dir() -> Iterator[Path]:
    """A data dir another user may enter (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="swarm-open-"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


async def test_another_user_is_refused(node_factory: NodeFactory) -> None:
    _nobody()
    with open_dir() as data_dir:
        async with node_factory(models=("fake:echo",), data_dir=data_dir) as node:
            path = socket_of(node)
            # The file's mode keeps others out (connecting needs write permission) ...
            got = await trio.to_thread.run_sync(as_nobody, path)
            assert got == "connect: 13", got  # EACCES
            # ... and where it would not, the kernel's word on the caller's uid does.
            path.chmod(0o666)
            got = await trio.to_thread.run_sync(as_nobody, path)
            assert got.startswith("answer: "), got
            decoder = Decoder()
            decoder.feed(bytes.fromhex(got.removeprefix("answer: ")))
            refusal = decoder.next_message()
            assert isinstance(refusal, Error) and refusal.code == ErrorCode.UNAUTHORIZED
            assert node.services.local is not None and node.services.local.refused_users == 1
            # Root and this user still get in.
            async with LocalClient.connect(path) as client:
                assert (await client.infer("echo", {"text": "x"})).meta["served_by"]


# --- bad bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        (b"\x00\x00\x00\x05hello", ErrorCode.MALFORMED),  # not msgpack
        (b"\x00\x00\x00\x00", ErrorCode.MALFORMED),  # an empty frame
        (b"\xff\xff\xff\xff", ErrorCode.TOO_LARGE),  # 4 GiB announced
        (encode(Request("r1", "echo", {"text": "x"}))[0], ErrorCode.MALFORMED),  # no hello
        (local.hello_frame("shell"), ErrorCode.BAD_REQUEST),  # no such service
        (local.hello_frame("infer", version=2), ErrorCode.BAD_REQUEST),
        (local.hello_frame("infer") + b"\x00\x00\x00\x03abc", ErrorCode.MALFORMED),
    ],
)
async def test_bad_bytes_get_a_typed_error_and_the_daemon_serves_on(
    node_factory: NodeFactory, sent: bytes, code: ErrorCode
) -> None:
    async with node_factory(models=("fake:echo",)) as node:
        async with raw(socket_of(node)) as stream:
            await stream.send_all(sent)
            reply = await answer(stream)
            assert isinstance(reply, Error) and reply.code == code, reply
            assert await answer(stream) is None  # and the connection is closed
        async with LocalClient.connect(socket_of(node)) as client:
            assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == node.peer_id


async def test_silent_and_vanishing_clients_cost_nothing(node_factory: NodeFactory) -> None:
    async with node_factory(models=("fake:echo",)) as node:
        async with raw(socket_of(node)):
            pass  # hangs up before its hello
        async with raw(socket_of(node)) as stream:
            await stream.send_all(local.hello_frame("infer")[:3])  # half a header, then gone
        async with LocalClient.connect(socket_of(node)) as client:
            assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == node.peer_id


def test_any_bytes_give_a_hello_or_a_protocol_error() -> None:
    rng = random.Random(11)
    good = local.hello_frame("view") + b"rest"
    for i in range(len(good) + 1):  # a byte at a time
        taken = local.take_hello(good[:i])
        if i < len(good) - 4:
            assert taken is None
        else:
            assert taken is not None and taken[0] == local.Hello(1, "view")
            assert taken[1] == good[len(good) - 4 : i]
    for _ in range(2000):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        if rng.random() < 0.5:
            blob = len(blob).to_bytes(4, "big") + blob
        with suppress(ProtocolError):
            local.take_hello(blob)
    with pytest.raises(FrameTooLarge):
        local.take_hello((local.HELLO_MAX + 1).to_bytes(4, "big"))


# --- the socket file -----------------------------------------------------------------------


async def test_the_socket_is_gone_after_stop_and_a_stale_one_is_replaced(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    async with node_factory("n", models=("fake:echo",)) as node:
        path = socket_of(node)
        assert path.is_socket()
    assert not path.exists()

    # What a killed daemon leaves: a socket file nobody listens on.
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    os.utime(path, (1_000_000, 1_000_000))  # marked: inode numbers are reused at once
    async with node_factory("n", models=("fake:echo",)) as node:
        assert path.stat().st_mtime > 1_000_000
        async with LocalClient.connect(path) as client:
            assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == node.peer_id
    assert not path.exists()


async def test_a_second_daemon_on_a_served_data_dir_refuses_to_start(
    node_factory: NodeFactory,
) -> None:
    async with node_factory("shared", models=("fake:echo",)) as first:
        with pytest.raises(BaseException) as raised:  # a group, from the node's nursery
            async with node_factory("shared", models=("fake:echo",)):
                pass
        exc = sole_error(raised.value)
        assert isinstance(exc, ConfigError) and "another daemon serves" in str(exc), exc
        # The first one still has its socket and serves on it.
        async with LocalClient.connect(socket_of(first)) as client:
            assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == first.peer_id


async def test_a_path_too_long_for_sun_path_still_serves(node_factory: NodeFactory) -> None:
    with tempfile.TemporaryDirectory(prefix="swarm-long-") as root:
        data_dir = Path(root, "d" * 60, "e" * 60)
        async with node_factory(models=("fake:echo",), data_dir=data_dir) as node:
            path = socket_of(node)
            assert len(os.fsencode(path)) > local.SUN_PATH_MAX and path.is_socket()
            assert json.loads((data_dir / "daemon.json").read_text())["socket"] == str(path)
            async with LocalClient.connect(path) as client:
                assert (await client.infer("echo", {"text": "x"})).meta["served_by"]
        assert not path.exists()


async def test_no_daemon_on_the_socket_is_peer_unavailable(tmp_path: Path) -> None:
    async with LocalClient.connect(tmp_path / SOCKET_FILE) as client:
        with pytest.raises(PeerUnavailable):
            await client.infer("echo", {"text": "x"})
        with pytest.raises(PeerUnavailable):
            await client.record()


# --- bounds --------------------------------------------------------------------------------


async def test_connections_beyond_the_cap_wait_for_a_free_slot(tmp_path: Path) -> None:
    async def view(stream: SocketFramed, peer_id: str) -> None:
        await stream.send(Error("", ErrorCode.BAD_REQUEST, peer_id))  # any one message

    served = local.LocalSocket(tmp_path / "s.sock", {"view": view}, peer_id="me", max_connections=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(served.run)
        # Two connections hold both slots (they never say hello); a third waits.
        async with raw(served.path) as one, raw(served.path), raw(served.path) as third:
            await third.send_all(local.hello_frame("view"))
            with trio.move_on_after(0.3):
                await answer(third)
                pytest.fail("a third connection was served beyond the cap of 2")
            await one.aclose()  # a slot frees: the third is served
            reply = await answer(third)
            assert isinstance(reply, Error) and reply.message == "me"
        nursery.cancel_scope.cancel()
    assert not served.path.exists()


async def test_an_idle_infer_stream_is_closed_but_not_while_its_request_runs() -> None:
    runners = {"slow": FakeRunner("slow", latency_s=0.4)}
    service = InferenceService(runners, node_id="n", max_queue=8)
    handler = InferHandler(service)
    a, b = trio.socket.socketpair()
    client = SocketFramed(trio.SocketStream(a), "server")
    server = SocketFramed(trio.SocketStream(b), "client")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handler.serve(server, "client", idle_timeout_s=0.2))
        await client.send(Request("r1", "slow", {"text": "x"}))
        reply = await client.receive()  # 400 ms, twice the idle bound
        assert isinstance(reply, Result) and reply.id == "r1"
        with trio.fail_after(2):
            assert await client.receive() is None  # then closed, being idle
    await client.close()
