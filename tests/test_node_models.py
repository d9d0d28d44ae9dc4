"""Models a node is told to serve: declared by flag or config.toml, loaded, or left out
with the reason shown; remote backends' circuit state in status and in the record."""

from __future__ import annotations

import socket

from conftest import NodeFactory
from fake_inference_servers import FakeVLLM

from node.client import SwarmClient
from runners.catalog import parse_model_spec


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
