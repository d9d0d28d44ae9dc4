"""Models a node is told to serve: declared by flag or config.toml, loaded, or left out
with the reason shown; remote backends' circuit state in status and in the record."""

from __future__ import annotations

import logging
import socket
import tomllib
from pathlib import Path

import httpx
import pytest
import trio
from conftest import NodeFactory
from fake_inference_servers import FakeVLLM
from support import eventually

from node.client import SwarmClient
from node.gateway import GatewayConfig
from node.models import ModelRegistry
from protocols import ConfigError, ErrorCode, RemoteError
from runners.catalog import ModelSpecError, parse_model_spec, specs_from_config
from runners.errors import ModelLoadError
from runners.fake import FakeRunner


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_model_that_does_not_load_is_left_out_and_said(
    node_factory: NodeFactory,
) -> None:
    gone = f"openai:name=gone,base_url=http://127.0.0.1:{_closed_port()},retries=0"
    async with node_factory("n", models=("fake:echo", parse_model_spec(gone))) as node:
        assert "gone" in node.models.failed and "echo" not in node.models.failed
        async with SwarmClient.connect(node.addrs[0]) as client:
            result = await client.infer("echo", {"text": "still serving"})
            view = (await client.record()).body["view"]
        assert result.meta["served_by"] == node.peer_id
        assert "gone" in view["models_failed"]
        assert "connect" in view["models_failed"]["gone"].lower()


async def test_backend_state_shows_in_status_and_record_without_its_address(
    node_factory: NodeFactory,
) -> None:
    with FakeVLLM(model="base-model") as server:
        spec = parse_model_spec(
            f"openai:name=llm,model=base-model,base_url={server.url},flavor=vllm"
        )
        async with node_factory("n", models=(spec,)) as node:
            async with SwarmClient.connect(node.addrs[0]) as client:
                record = await client.record()
            state = record.body["view"]["runners"]["llm"]
            assert state["endpoint"]["breaker"] == "closed" and state["model"] == "base-model"
            assert record.body["circuits"] == {"llm": "closed"}
            assert server.url not in repr(record.body)


async def test_container_mode_without_an_engine_runs_in_api_mode(
    node_factory: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # This machine has the docker client but no engine (and CI may have neither):
    # either way the node must say so and forward to the configured URL.
    with FakeVLLM(model="base-model") as server:
        spec = specs_from_config(
            tomllib.loads(
                f"""
                [[models]]
                kind = "openai"
                name = "llm"
                model = "base-model"
                flavor = "vllm"
                base_url = "{server.url}"
                [models.container]
                kind = "vllm"
                name = "swarm-test-vllm"
                model_name = "base-model"
                host_port = 18000
                """
            ),
            "config.toml",
        )[0]
        assert spec.container is not None and spec.container.host_port == 18000
        with caplog.at_level(logging.WARNING, logger="runners.remote.contained"):
            async with (
                node_factory("n", models=(spec,)) as node,
                SwarmClient.connect(node.addrs[0]) as client,
            ):
                view = (await client.record()).body["view"]
        state = view["runners"]["llm"]
        assert state["mode"] == "api" and "running in API mode" in state["engine"]
        assert "no container engine" in caplog.text


def test_a_container_table_gives_the_default_url() -> None:
    spec = specs_from_config(
        tomllib.loads(
            """
            [[models]]
            kind = "ovms"
            name = "resnet"
            model = "resnet"
            [models.container]
            kind = "ovms"
            name = "ovms-1"
            model_name = "resnet"
            model_path = "/srv/models/resnet"
            host_port = 9001
            """
        ),
        "config.toml",
    )[0]
    assert spec.config.endpoint.base_url == "http://127.0.0.1:9001"
    with pytest.raises(ModelSpecError, match=r"config.toml: models\[0\].container.kind: required$"):
        specs_from_config(
            {"models": [{**{"kind": "ovms", "name": "r", "model": "r"}, "container": {}}]},
            "config.toml",
        )


async def test_declared_models_unload_and_load_again_over_http(node_factory: NodeFactory) -> None:
    async with (
        node_factory("b", models=("fake:echo",)) as b,
        node_factory(
            "a", models=("fake:echo", "fake:solo"), peers=(b.addrs[0],), http=GatewayConfig()
        ) as a,
    ):
        assert a.gateway is not None and a.services.service is not None
        async with httpx.AsyncClient(base_url=a.gateway.url) as http:
            gone = await http.post("/models/unload", json={"model": "solo"})
            assert gone.status_code == 200 and gone.json()["changed"] is True
            assert "solo" not in a.services.service.runners
            async with SwarmClient.connect(a.addrs[0]) as client:
                with pytest.raises(RemoteError) as raised:
                    await client.infer("solo", {"text": "nobody has it now"})
                assert raised.value.code is ErrorCode.MODEL_NOT_FOUND
                # echo is unloaded here too, but b serves it: jobs go there.
                await http.post("/models/unload", json={"model": "echo"})
                moved = await client.infer("echo", {"text": "to the peer"})
                assert moved.meta["served_by"] == b.peer_id
                back = await http.post("/models/load", json={"model": "solo"})
                assert back.status_code == 200 and back.json()["changed"] is True
                again = await client.infer("solo", {"text": "back"})
                assert again.meta["served_by"] == a.peer_id
            # Only what the config declares: never a path, never another model.
            for body in ({"model": "/etc/passwd"}, {"model": "openvino:path=/tmp/x.xml"}):
                refused = await http.post("/models/load", json=body)
                assert refused.status_code == 404, refused.text
                assert "not declared in this node's config" in refused.json()["error"]["message"]
            bad = await http.post("/models/load", json={"name": "solo"})
            assert bad.status_code == 400


async def test_a_model_unloaded_while_busy_finishes_its_jobs(node_factory: NodeFactory) -> None:
    async with node_factory("a", models=("fake:slow:300",)) as a:
        async with SwarmClient.connect(a.addrs[0]) as client:
            results = []

            async def job() -> None:
                results.append(await client.infer("slow", {"text": "in flight"}))

            service = a.services.service

            async with trio.open_nursery() as nursery:
                nursery.start_soon(job)
                await eventually(lambda: service.gates["slow"].running == 1)  # admitted, running
                done = await a.unload_model("slow")
        assert done["changed"] is True and len(results) == 1
        assert results[0].meta["served_by"] == a.peer_id


async def test_a_model_loaded_on_request_is_announced_in_the_dht(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("boot", models=(), dht=True) as boot,
        node_factory("a", models=("fake:solo",), dht=True, bootstrap=(boot.addrs[0],)) as a,
    ):
        await a.unload_model("solo")
        assert "solo" not in a.services.dht.providing
        await a.load_model("solo")
        with trio.fail_after(20):
            while "solo" not in a.services.dht.providing:  # noqa: ASYNC110 (no event to wait on)
                await trio.sleep(0.05)
            while True:  # and the boot node finds it as a provider
                found = await boot.services.dht.find_providers("solo", 5.0)
                if any(p.peer_id == a.peer_id for p in found):
                    break
                await trio.sleep(0.2)


class Tracked(FakeRunner):
    """A fake whose loads and closes are counted; ``fails`` makes its load fail."""

    def __init__(self, name: str, *, fails: bool = False) -> None:
        super().__init__(name)
        self.fails = fails
        self.closed = 0

    async def load(self) -> None:
        if self.fails:
            raise ModelLoadError(f"{self.info.name}: the weights are not there")

    async def close(self) -> None:
        self.closed += 1


async def test_every_runner_built_is_closed_loaded_or_not(node_factory: NodeFactory) -> None:
    good, bad = Tracked("good"), Tracked("bad", fails=True)
    async with node_factory("n", models=("fake:echo",), runners=[good, bad]) as node:
        # The one that failed is closed at once, not when the node stops.
        assert bad.closed == 1 and good.closed == 0
        assert "bad" in node.models.failed and "good" in node.models.runners
    assert good.closed == 1 and bad.closed == 1  # each exactly once


async def test_runners_built_before_a_bad_declaration_are_closed(tmp_path: Path) -> None:
    """Two models of one name: the node refuses to start, after closing what it built."""
    first, twin = Tracked("twin"), Tracked("twin")
    registry = ModelRegistry(("fake:other",), tmp_path, extra=[first, twin])
    with pytest.raises(ConfigError, match="configured twice"):
        await registry.load_all()
    assert first.closed == 1 and twin.closed == 1
    assert registry.runners == {}
