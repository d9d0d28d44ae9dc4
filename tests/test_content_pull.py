"""Models that travel between peers: real nodes share EfficientNet-Lite0's converted
IR over /swarm/blob/1.0.0, and a node with an empty data dir pulls it and serves it.

The IR is converted once per session (torch -> OpenVINO, ~20-60 s here). Each
provider serves its own copy (a test damages one); the pullers' bandwidth caps
and small chunks make "mid-pull" a matter of seconds, not of luck.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from conftest import NodeFactory
from support import eventually

from bootstrap.addrs import peer_info
from node.content.blob import MANIFEST, BlobClient
from node.content.config import ContentConfig
from node.daemon import Node
from node.jobs.outbound import Caller
from node.net.host import running_host
from protocols import MAX_HOPS, Request, Tensor
from protocols.codes import ErrorCode
from protocols.content import cid_text, digest, parse_cid
from protocols.errors import RemoteError
from runners.convert_efficientnet import probe_input

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 256 * 1024
RATE = 3_000_000.0  # bytes a second each provider sends: ~3 s for both, ~6 s for one


@pytest.fixture(scope="session")
def effnet_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("effnet-ir")
    subprocess.run(
        [sys.executable, "-m", "runners.convert_efficientnet", str(out), "fp32"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    (out / "probe.json").unlink()  # the model is the .xml and its .bin
    return out


def own_copy(ir: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    for f in ir.iterdir():
        shutil.copy(f, where / f.name)
    return where / "model.xml"


def serves(node: Node) -> bool:
    """Whether ``node`` takes jobs for effnet (loaded, shared on, in its service)."""
    return "effnet" in node.services.service.runners


def provider_spec(xml: Path) -> str:
    return f"openvino:name=effnet,path={xml},task=classify"


def content(rate: float = RATE, **fields: Any) -> ContentConfig:
    return ContentConfig(upload_rate=rate, chunk_size=CHUNK, **fields)


async def answer(node: Node, client: Any, caller: Caller) -> np.ndarray:
    """One job on ``node``'s own runner (its last hop: never forwarded)."""
    peer = peer_info(node.addrs[0]).peer_id
    await client.connect(peer_info(node.addrs[0]))
    pixels = Tensor.from_numpy(np.ascontiguousarray(probe_input()[:1]))
    request = Request(f"job-{node.peer_id[-6:]}", "effnet", {"pixel_values": pixels}, hops=MAX_HOPS)
    result = await caller.call(peer, request)
    out = result.outputs["logits"]
    assert isinstance(out, Tensor)
    return out.numpy()


async def test_an_empty_node_pulls_from_both_providers_and_answers_like_them(
    node_factory: NodeFactory, effnet_ir: Path, tmp_path: Path
) -> None:
    async with (
        node_factory(
            "b", models=(provider_spec(own_copy(effnet_ir, tmp_path / "ir-b")),), content=content()
        ) as b,
        node_factory(
            "c", models=(provider_spec(own_copy(effnet_ir, tmp_path / "ir-c")),), content=content()
        ) as c,
    ):
        cid = b.services.content.models["effnet"]
        assert c.services.content.models["effnet"] == cid  # the same bytes, the same id
        spec = f"openvino:name=effnet,content={cid},task=classify"
        async with node_factory(
            "a", models=(spec,), peers=(b.addrs[0], c.addrs[0]), content=content()
        ) as a:
            assert a.models.find("effnet") is None  # nothing on its disk: it pulls
            await eventually(lambda: serves(a), 120)
            progress = a.services.content.pulls[cid]
            assert set(progress.by_provider) == {b.peer_id, c.peer_id}, progress.describe()
            assert all(n >= CHUNK for n in progress.by_provider.values())
            assert progress.done_bytes == progress.total_bytes and not progress.struck
            # It shares what it pulled, under the same id, and says so in its record.
            assert a.services.content.models["effnet"] == cid
            assert a.status()["view"]["content"]["providers"][cid] == 2
            async with running_host(None, ()) as client:
                caller = Caller(client)
                try:
                    here, there = await answer(a, client, caller), await answer(b, client, caller)
                finally:
                    await caller.close()
            assert np.array_equal(here, there)
            assert int(here[0].argmax()) == int(there[0].argmax())


async def test_a_provider_killed_mid_pull_leaves_the_other_to_finish(
    node_factory: NodeFactory, effnet_ir: Path, tmp_path: Path
) -> None:
    async with node_factory(
        "b", models=(provider_spec(own_copy(effnet_ir, tmp_path / "ir-b")),), content=content()
    ) as b:
        cid = b.services.content.models["effnet"]
        spec = f"openvino:name=effnet,content={cid},task=classify"
        async with trio.open_nursery() as nursery:
            c_running = trio.Event()
            c_stop = trio.Event()
            c_box: list[Node] = []

            async def run_c() -> None:
                xml = own_copy(effnet_ir, tmp_path / "ir-c")
                async with node_factory("c", models=(provider_spec(xml),), content=content()) as c:
                    c_box.append(c)
                    c_running.set()
                    await c_stop.wait()

            nursery.start_soon(run_c)
            await c_running.wait()
            c = c_box[0]
            async with node_factory(
                "a", models=(spec,), peers=(b.addrs[0], c.addrs[0]), content=content()
            ) as a:
                await eventually(lambda: cid in a.services.content.pulls, 30)
                progress = a.services.content.pulls[cid]
                await eventually(lambda: progress.by_provider.get(c.peer_id, 0) >= 2 * CHUNK, 60)
                assert progress.done_bytes < progress.total_bytes / 2  # well within the pull
                c_stop.set()  # C goes away mid-pull
                await eventually(lambda: serves(a), 120)
                assert c.peer_id in progress.dropped and not progress.struck
                assert progress.by_provider[b.peer_id] > progress.by_provider[c.peer_id]
                assert progress.done_bytes == progress.total_bytes


async def test_a_provider_sending_a_bad_chunk_is_struck_and_the_chunk_fetched_elsewhere(
    node_factory: NodeFactory, effnet_ir: Path, tmp_path: Path, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    bad_xml = own_copy(effnet_ir, tmp_path / "ir-c")
    async with (
        node_factory(
            "b", models=(provider_spec(own_copy(effnet_ir, tmp_path / "ir-b")),), content=content()
        ) as b,
        node_factory("c", models=(provider_spec(bad_xml),), content=content()) as c,
    ):
        cid = b.services.content.models["effnet"]
        # C's copy is damaged after it made its manifest: it serves chunks that do not
        # match, early ones so that it is asked for them.
        weights = bad_xml.with_suffix(".bin")
        data = bytearray(weights.read_bytes())
        for k in range(8):
            data[int(rng.integers(k * CHUNK, (k + 1) * CHUNK))] ^= 0xFF
        weights.write_bytes(bytes(data))
        spec = f"openvino:name=effnet,content={cid},task=classify"
        async with node_factory(
            "a", models=(spec,), peers=(b.addrs[0], c.addrs[0]), content=content()
        ) as a:
            await eventually(lambda: serves(a), 120)
            progress = a.services.content.pulls[cid]
            assert set(progress.struck) == {c.peer_id}, progress.describe()
            assert "does not match" in progress.struck[c.peer_id]
            pulled = a.config.models_dir / "content" / cid / "model.bin"
            assert digest(pulled.read_bytes()) == digest((tmp_path / "ir-b/model.bin").read_bytes())


async def test_unshared_content_and_bad_indices_are_refused_typed(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "weights.bin").write_bytes(b"w" * 10_000)
    (tmp_path / "secret.bin").write_bytes(b"s" * 10_000)
    async with node_factory("p", models=("fake:echo",), content=content(rate=0)) as p:
        cid = parse_cid(await p.services.content.share_path(shared))
        secret = digest(b"s" * 10_000)  # a hash of a file outside the share
        async with running_host(None, ()) as client:
            await client.connect(peer_info(p.addrs[0]))
            blob = BlobClient(client, p.peer_id)
            try:
                manifest = await blob.get(cid, MANIFEST, 1 << 20)
                assert digest(manifest) == cid
                assert await blob.get(cid, 0, 1 << 20) == b"w" * 10_000
                with pytest.raises(RemoteError) as unshared:
                    await blob.get(secret, 0, 1 << 20)
                assert unshared.value.code is ErrorCode.MODEL_NOT_FOUND
                with pytest.raises(RemoteError) as past:
                    await blob.get(cid, 5, 1 << 20)
                assert past.value.code is ErrorCode.BAD_REQUEST
                assert "secret" not in repr(unshared.value) + repr(past.value)
            finally:
                await blob.close()
        assert p.services.content.server.refused == 2
        assert p.status()["view"]["content"]["shares"][0]["content"] == cid_text(cid)


async def test_max_uploads_refuses_the_stream_over_it(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "shared.bin"
    shared.write_bytes(b"x" * 8192)
    async with node_factory(
        "p", models=("fake:echo",), content=dataclasses.replace(content(rate=0), max_uploads=1)
    ) as p:
        cid = parse_cid(await p.services.content.share_path(shared))
        async with running_host(None, ()) as client:
            await client.connect(peer_info(p.addrs[0]))
            first, second = BlobClient(client, p.peer_id), BlobClient(client, p.peer_id)
            try:
                assert await first.get(cid, 0, 1 << 20) == b"x" * 8192  # holds its slot
                with pytest.raises(RemoteError) as busy:
                    await second.get(cid, 0, 1 << 20)
                assert busy.value.code is ErrorCode.OVERLOADED
            finally:
                await first.close()
                await second.close()


async def test_a_model_converted_in_the_data_dir_is_shared_by_its_ir(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """EfficientNet-Lite0 converted into the node's models dir (the first start's
    conversion): its IR gets a manifest, kept in the data dir, and a content id."""
    spec = "openvino-classify:precision=fp32,inference_precision=f32"
    async with node_factory("b", models=(spec,), content=content(rate=0)) as b:
        cid = b.services.content.models["efficientnet-lite0"]
        [share] = [s for s in b.services.content.shares.shares() if s.manifest.cid == cid]
        assert [f.name for f in share.manifest.files] == ["model.xml", "model.bin"]
        assert all(
            p.is_relative_to(b.config.models_dir / "efficientnet-lite0") for p in share.paths
        )
        assert [f.size for f in share.manifest.files] == [p.stat().st_size for p in share.paths]
        kept = list((b.config.data_dir / "content" / "index").glob("*.manifest"))
        assert len(kept) == 1 and digest(kept[0].read_bytes()) == parse_cid(cid)
        [entry] = [m for m in b.status()["models"] if m["name"] == "efficientnet-lite0"]
        assert entry["content"] == cid  # in its record
