"""A pull that is interrupted resumes from its verified chunks; a provider's manifest
with names that leave the share is refused and nothing is written outside the pull's
dir. Real nodes and hosts on loopback, real files."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from conftest import NodeFactory
from support import eventually

from bootstrap.addrs import peer_info
from node.content.blob import BLOB_PROTOCOL, Data, Decoder, Get, encode, receive
from node.content.config import ContentConfig
from node.content.pull import PARTIAL_PREFIX, PullConfig, Puller, PullFailed
from node.net.host import running_host
from protocols.content import MIN_CHUNK, cid_text, digest, parse_cid

CHUNK = 64 * 1024


async def test_an_interrupted_pull_resumes_and_fetches_only_the_rest(
    node_factory: NodeFactory, tmp_path: Path, seed: int
) -> None:
    data = random_bytes(seed, 40 * CHUNK + 123)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "weights.bin").write_bytes(data)
    config = ContentConfig(upload_rate=1_000_000.0, chunk_size=CHUNK)
    async with node_factory("p", models=("fake:echo",), content=config) as p:
        cid = parse_cid(await p.services.content.share_path(shared))
        root = tmp_path / "pulled"
        async with running_host(None, ()) as host:
            await host.connect(peer_info(p.addrs[0]))
            first = Puller(host, cid, root, PullConfig(streams_per_provider=1))
            with trio.move_on_after(0.8):
                await first.run([p.peer_id])
            done = first.progress.done_chunks
            assert 2 <= done < 41, first.progress.describe()  # interrupted mid-way
            partial = root / f"{PARTIAL_PREFIX}{cid_text(cid)}"
            # A mark whose bytes did not reach the disk (a crash) is checked, not trusted.
            damage(partial / "files" / "weights.bin", 0)
            second = Puller(host, cid, root, PullConfig(streams_per_provider=2))
            final = await second.run([p.peer_id])
        assert (final / "weights.bin").read_bytes() == data
        assert second.progress.resumed_bytes == (done - 1) * CHUNK
        # Only what was missing was fetched again (the damaged chunk among it).
        assert sum(second.progress.by_provider.values()) == len(data) - (done - 1) * CHUNK
        assert not partial.exists()


async def test_a_manifest_naming_paths_outside_is_refused_and_nothing_written(
    tmp_path: Path,
) -> None:
    evil_body = {
        "v": 1,
        "chunk": MIN_CHUNK,
        "files": [["../escaped.bin", 3], ["/tmp/abs.bin", 3]],
        "chunks": [digest(b"abc"), digest(b"abc")],
    }
    evil: bytes = msgpack.packb(evil_body, use_bin_type=True)
    cid = digest(evil)  # the id matches: only the entries can refuse it

    async def provider(stream: Any) -> None:
        request = await receive(stream, Decoder(256))
        assert isinstance(request, Get)
        await stream.write(encode(Data(evil if request.index == -1 else b"abc")))
        with contextlib.suppress(Exception):
            await stream.close()

    root = tmp_path / "root" / "content"
    async with running_host(None, ("/ip4/127.0.0.1/tcp/0",)) as bad:
        bad.set_stream_handler(BLOB_PROTOCOL, provider)
        addr = f"{bad.get_addrs()[0]}"
        async with running_host(None, ()) as host:
            await host.connect(peer_info(addr if "/p2p/" in addr else f"{addr}/p2p/{bad.get_id()}"))
            with pytest.raises(PullFailed, match="bad manifest"):
                await Puller(host, cid, root).run([str(bad.get_id())])
    assert not (tmp_path / "root" / "escaped.bin").exists()
    assert not glob.glob(f"{tmp_path}/**/*.bin", recursive=True)  # not a byte of it anywhere


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def damage(path: Path, index: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff\xfe", index * CHUNK + 7)
    finally:
        os.close(fd)


async def test_swarm_models_share_and_pull_from_the_command_line(
    node_factory: NodeFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str], seed: int
) -> None:
    from node.cli.main import main

    data = random_bytes(seed, 5 * CHUNK + 1)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(data)
    provider_dir = tmp_path / "p"
    args = ["models", "share", str(tmp_path / "weights"), "--data-dir", str(provider_dir)]
    assert await trio.to_thread.run_sync(main, [*args, "--json"]) == 0
    out = capfd.readouterr().out
    shared = json.loads(out[out.index("{") :])  # after the seed's line
    config = ContentConfig(chunk_size=CHUNK)
    # The daemon shares what was declared from its start; the manifest was made then.
    async with node_factory("p", models=("fake:echo",), content=ContentConfig()) as p:
        assert shared["content"] in p.services.content.share_ids()
        async with node_factory(
            "a", models=("fake:echo",), peers=(p.addrs[0],), content=config
        ) as a:
            await eventually(lambda: bool(a.status()["view"]["content"]["providers"]), 10)
            pull = ["models", "pull", shared["content"], "--data-dir", str(tmp_path / "a")]
            assert await trio.to_thread.run_sync(main, pull) == 0
            out, err = capfd.readouterr()
            assert "pulled " in err and "1 provider" not in out  # progress lines on stderr
            pulled = a.config.models_dir / "content" / shared["content"] / "w.bin"
            assert pulled.read_bytes() == data


async def test_shared_content_is_announced_as_a_dht_provider_record(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    from node.content.shares import declare_share

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.bin").write_bytes(b"x" * 5000)
    declare_share(tmp_path / "a" / "content", tmp_path / "w")  # as `swarm models share` does
    async with (
        node_factory("boot", models=(), dht=True) as boot,
        node_factory("a", models=("fake:solo",), dht=True, bootstrap=(boot.addrs[0],)) as a,
    ):
        [cid] = a.services.content.share_ids()
        dht = boot.services.dht
        assert dht is not None
        with trio.fail_after(30):
            while True:  # the boot node finds a under the content id's key
                found = await dht.find_key_providers(parse_cid(cid), cid, 5.0)
                if any(p.peer_id == a.peer_id for p in found):
                    break
                await trio.sleep(0.2)
        # and the finder pulls use (records and the DHT together) names a
        assert boot.services.content.find is not None
        assert a.peer_id in await boot.services.content.find(parse_cid(cid))


async def test_content_over_the_pull_limit_is_refused_before_a_file_is_made(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    (tmp_path / "big.bin").write_bytes(b"b" * 50_000)
    async with node_factory("p", models=("fake:echo",)) as p:
        cid = parse_cid(await p.services.content.share_path(tmp_path / "big.bin"))
        root = tmp_path / "pulled"
        async with running_host(None, ()) as host:
            await host.connect(peer_info(p.addrs[0]))
            with pytest.raises(PullFailed, match="over this node's 10000"):
                await Puller(host, cid, root, PullConfig(max_bytes=10_000)).run([p.peer_id])
    assert not glob.glob(f"{root}/**/*.bin", recursive=True)
