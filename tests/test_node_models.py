"""Models a node is told to serve: declared by flag or config.toml, loaded, or left out
with the reason shown; remote backends' circuit state in status and in the record."""

from __future__ import annotations

import logging
import socket
import tomllib

import pytest
from conftest import NodeFactory
from fake_inference_servers import FakeVLLM

from node.client import SwarmClient
from runners.catalog import ModelSpecError, parse_model_spec, specs_from_config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_model_that_does_not_load_is_left_out_and_said(
    node_factory: NodeFactory,
) -> None:
    gone = f"openai:name=gone,base_url=http://127.0.0.1:{_closed_port()},retries=0"
    async with node_factory("n", models=("fake:echo", parse_model_spec(gone))) as node:
        assert "gone" in node.failed_models and "echo" not in node.failed_models
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
            assert state["breaker"] == "closed" and state["model"] == "base-model"
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
