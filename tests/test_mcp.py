"""The MCP tools against real nodes, through the official SDK's own client.

Two in-process nodes: "gw" serves the gateway (and /mcp) and one fake model of
its own ("here"); "peer" serves "echo" and "slow". Every call goes over real
HTTP on loopback through ``mcp.client.streamable_http`` and ``ClientSession``;
the stdio test runs ``swarm mcp`` as a process against a real daemon process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import mcp_types as types
import pytest
import trio
from conftest import NodeFactory
from fake_inference_servers import FakeVLLM
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from test_daemon_processes import REPO, child_env, daemons_under

from node.daemon import Node
from node.gateway import GatewayConfig
from node.mcp.bridge import daemon_url
from node.mcp.tools import redact
from protocols.errors import ConfigError
from runners.catalog import parse_model_spec

TOKEN = "mcp-token"
TOOLS = {
    "list_backends",
    "list_peers",
    "swarm_status",
    "select_peer",
    "route_inference",
    "list_tasks",
}
CALL_S = 15  # bound on any one exchange


@asynccontextmanager
async def swarm(node_factory: NodeFactory, **http: Any) -> AsyncIterator[tuple[Node, Node, str]]:
    """(gateway node, peer node, gateway URL)."""
    async with (
        node_factory("peer", models=("fake:echo", "fake:slow:2000")) as peer,
        node_factory(
            "gw", models=("fake:here",), peers=(peer.addrs[0],), http=GatewayConfig(**http)
        ) as gw,
    ):
        assert gw.gateway is not None
        yield gw, peer, gw.gateway.url


@asynccontextmanager
async def session(url: str, token: str | None = None) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with (
        httpx2.AsyncClient(headers=headers, timeout=CALL_S) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write, read_timeout_seconds=CALL_S) as mcp,
    ):
        with trio.fail_after(CALL_S):
            await mcp.initialize()
        yield mcp


async def call(mcp: ClientSession, tool: str, **arguments: Any) -> types.CallToolResult:
    with trio.fail_after(CALL_S):
        result = await mcp.call_tool(tool, arguments)
    assert isinstance(result, types.CallToolResult)
    return result


async def ok(mcp: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await call(mcp, tool, **arguments)
    assert not result.is_error, result.content
    data: dict[str, Any] = result.structured_content
    text = result.content[0]
    assert isinstance(text, types.TextContent) and json.loads(text.text) == data
    return data


async def failed(mcp: ClientSession, tool: str, **arguments: Any) -> tuple[str, str]:
    """(error code, message) of a call that must fail as a tool error."""
    result = await call(mcp, tool, **arguments)
    assert result.is_error, result.structured_content
    error = result.structured_content["error"]
    text = result.content[0]
    assert isinstance(text, types.TextContent) and text.text.startswith(error["code"] + ": ")
    return error["code"], error["message"]


async def test_tools_are_listed_with_their_schemas(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (_, _, url), session(url) as mcp:
        listed = (await mcp.list_tools()).tools
    assert {t.name for t in listed} == TOOLS
    by_name = {t.name: t for t in listed}
    assert by_name["route_inference"].input_schema["required"] == ["model", "inputs"]
    assert by_name["select_peer"].input_schema["required"] == ["model"]
    assert all(t.description and t.input_schema["type"] == "object" for t in listed)
    annotations = by_name["list_peers"].annotations
    assert annotations is not None and annotations.read_only_hint is True


async def test_route_inference_runs_where_the_model_is(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gw, peer, url), session(url) as mcp:
        there = await ok(mcp, "route_inference", model="ECHO", inputs=["a", "bb", "a"])
        here = await ok(mcp, "route_inference", model="here", inputs="hi", params={"chunks": 2})
        tensor = {"dtype": "float32", "shape": [2, 2], "data": [[1, 2], [3, 4.5]]}
        named = await ok(mcp, "route_inference", model="echo", inputs={"x": tensor})
        flat = {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4.5]}
        same = await ok(mcp, "route_inference", model="echo", inputs={"x": flat}, priority="high")
    assert there["model"] == "echo"  # the name as the serving node spells it
    assert there["meta"]["served_by"] == peer.peer_id  # only the other node serves it
    assert there["meta"]["forwarded_by"] == gw.peer_id and there["meta"]["attempts"] == 1
    rows = there["outputs"]["embedding"]
    assert rows["dtype"] == "float32" and rows["shape"] == [3, 8]
    assert rows["data"][0] == rows["data"][2] != rows["data"][1]  # row i is text i's
    assert here["meta"]["served_by"] == gw.peer_id
    assert len(here["outputs"]["text"].split()) == 2  # the params reached the runner
    # For x, FakeRunner answers 2 * sum(row) in every column.
    assert [r[0] for r in named["outputs"]["embedding"]["data"]] == [6.0, 15.0]
    assert same["outputs"] == named["outputs"]


async def test_select_peer_names_the_node_that_would_run_it(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gw, peer, url), session(url) as mcp:
        remote = await ok(mcp, "select_peer", model="echo")
        local = await ok(mcp, "select_peer", model="here", strategy="local-first")
        served = peer.services.service.stats.served if peer.services.service else -1
    assert remote["chosen"]["node"] == peer.peer_id and remote["chosen"]["local"] is False
    assert remote["order"] == [peer.peer_id]
    [candidate] = remote["candidates"]
    assert candidate["model"] == "echo" and isinstance(candidate["score"], float)
    assert remote["strategy"] == "least-loaded" and remote["priority"] == "normal"
    assert local["chosen"] == {**local["candidates"][0], "node": gw.peer_id, "local": True}
    assert local["strategy"] == "local-first"
    assert served == 0  # selecting ran nothing


async def test_peers_backends_tasks_and_status(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gw, peer, url), session(url) as mcp:
        peers = await ok(mcp, "list_peers")
        only_slow = await ok(mcp, "list_peers", model="SLOW")
        only_here = await ok(mcp, "list_peers", model="here")
        backends = await ok(mcp, "list_backends")
        tasks = await ok(mcp, "list_tasks")
        status = await ok(mcp, "swarm_status")
    [row] = peers["peers"]
    assert peers["node"] == gw.peer_id and row["peer_id"] == peer.peer_id
    assert row["addrs"] and all(a.endswith(f"/p2p/{peer.peer_id}") for a in row["addrs"])
    assert {m["name"] for m in row["models"]} == {"echo", "slow"}
    assert row["health"]["status"] == "linked" and row["health"]["breaker"] == "closed"
    assert row["hardware"] and isinstance(row["load"]["queue_depth"], dict)
    assert [p["peer_id"] for p in only_slow["peers"]] == [peer.peer_id]
    assert only_here["peers"] == []  # only the gateway node itself serves it
    assert backends["node"] == gw.peer_id
    assert [m["name"] for m in backends["models"]] == ["here"] and backends["failed"] == {}
    assert backends["models"][0]["runner"] == "fake"
    [fake] = tasks["tasks"]
    assert fake["task"] == "fake"
    assert sorted((m["model"], m["nodes"]) for m in fake["models"]) == [
        ("echo", 1),
        ("here", 1),
        ("slow", 1),
    ]
    assert status["summary"] == {
        "node": gw.peer_id,
        "live_peers": 1,
        "models": {"echo": 1, "here": 1, "slow": 1},
    }
    assert status["node"]["peer_id"] == gw.peer_id and "routing" in status["node"]["view"]


async def test_a_failing_peer_shows_in_its_health_and_is_not_selected(
    node_factory: NodeFactory,
) -> None:
    async with swarm(node_factory) as (_, peer, url), session(url) as mcp:
        for _ in range(3):  # INTERNAL counts against the peer; 3 open its breaker
            code, _ = await failed(
                mcp, "route_inference", model="echo", inputs="x", params={"fail": "INTERNAL"}
            )
            assert code == "INTERNAL"
        peers = await ok(mcp, "list_peers")
        selected = await ok(mcp, "select_peer", model="echo")
    [row] = peers["peers"]
    assert row["peer_id"] == peer.peer_id
    assert row["health"]["breaker"] == "open" and row["health"]["failures"] == 3
    assert selected["chosen"] is None and selected["candidates"] == []
    assert "breakers open" in selected["why"]


async def test_bad_calls_and_swarm_errors_are_typed_tool_errors(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (_, _, url), session(url) as mcp:
        unknown = await failed(mcp, "route_inference", model="nope", inputs="x")
        unknown_select = await failed(mcp, "select_peer", model="nope")
        no_inputs = await failed(mcp, "route_inference", model="echo", inputs=42)
        extra = await failed(mcp, "list_peers", modle="echo")
        strategy = await failed(mcp, "select_peer", model="echo", strategy="fastest")
        shape = await failed(
            mcp,
            "route_inference",
            model="echo",
            inputs={"x": {"dtype": "float32", "shape": [3], "data": [1]}},
        )
        dtype = await failed(
            mcp, "route_inference", model="echo", inputs={"x": {"dtype": "complex", "data": [1]}}
        )
        deadline = await failed(mcp, "route_inference", model="echo", inputs="x", deadline_ms=0)
        refused = await failed(
            mcp, "route_inference", model="echo", inputs="x", params={"fail": "OVERLOADED"}
        )
        late = await failed(mcp, "route_inference", model="slow", inputs="x", deadline_ms=100)
        runner = await failed(mcp, "route_inference", model="echo", inputs={"text": "a", "x": 1})
        no_tool = await failed(mcp, "no_such_tool")
        after = await ok(mcp, "route_inference", model="echo", inputs="still serving")
    assert unknown[0] == unknown_select[0] == "MODEL_NOT_FOUND" and "'nope'" in unknown[1]
    assert no_inputs[0] == "BAD_REQUEST" and "route_inference.inputs" in no_inputs[1]
    assert extra[0] == "BAD_REQUEST" and "modle" in extra[1] and "model" in extra[1]
    assert strategy[0] == "BAD_REQUEST" and "'fastest'" in strategy[1]
    assert shape[0] == "BAD_REQUEST" and "do not fill shape [3]" in shape[1]
    assert dtype[0] == "BAD_REQUEST" and "dtype" in dtype[1]
    assert deadline[0] == "BAD_REQUEST" and "deadline_ms" in deadline[1]
    assert refused[0] == "OVERLOADED"  # the peer's typed error, through the swarm
    assert late[0] == "DEADLINE_EXCEEDED"
    assert runner[0] == "BAD_REQUEST"  # the runner's own check, on the peer
    assert no_tool[0] == "BAD_REQUEST" and "route_inference" in no_tool[1]
    assert after["outputs"]["embedding"]["shape"] == [1, 8]


async def test_the_token_and_limits_guard_mcp_like_every_route(node_factory: NodeFactory) -> None:
    async with swarm(node_factory, token=TOKEN, max_body=4096) as (gw, _, url):
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        async with httpx.AsyncClient(base_url=url, timeout=CALL_S) as http:
            denied = await http.post("/mcp", json=body)
            wrong = await http.post("/mcp", json=body, headers={"Authorization": "Bearer no"})
            auth = {"Authorization": f"Bearer {TOKEN}"}
            rebinding = await http.post(
                "/mcp", json=body, headers={**auth, "Host": "evil.example:80"}
            )
            page = await http.post(
                "/mcp", json=body, headers={**auth, "Origin": "http://evil.example"}
            )
            big = {**body, "params": {"padding": "x" * 8192}}
            too_large = await http.post("/mcp", json=big, headers=auth)
        async with session(url, TOKEN) as mcp:
            answer = await ok(mcp, "swarm_status")
    assert denied.status_code == wrong.status_code == 401
    assert denied.json()["error"]["code"] == "unauthorized"
    assert rebinding.status_code == 421  # a Host that is not loopback: DNS rebinding
    assert page.status_code == 403  # a web page elsewhere
    assert too_large.status_code == 413  # the gateway's body limit holds for /mcp too
    assert answer["summary"]["node"] == gw.peer_id


async def test_the_gateway_without_tools_still_answers(node_factory: NodeFactory) -> None:
    """A Backend built without the MCP fields: the gateway serves, those tools say why not.

    Its status callable also records where tools run: on this test's trio loop, in
    its thread (the SDK's anyio runs on trio; no second loop, no thread bridge)."""
    from node.gateway import Backend, Gateway

    seen: list[tuple[int, object]] = []
    async with swarm(node_factory) as (gw, _, _):
        assert gw.gateway is not None
        full = gw.gateway.backend

        def status() -> Any:
            seen.append((threading.get_ident(), trio.lowlevel.current_root_task()))
            return full.status()

        bare = Backend(execute=full.execute, models=full.models, status=status)
        gateway = Gateway(bare, GatewayConfig(), shutdown=trio.sleep_forever)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(gateway.run)
            async with session(url) as mcp:
                backends = await failed(mcp, "list_backends")
                peers = await ok(mcp, "list_peers")
                routed = await ok(mcp, "route_inference", model="echo", inputs="x")
            nursery.cancel_scope.cancel()
    assert backends[0] == "NOT_EXECUTED" and "backends" in backends[1]
    assert peers["peers"] == []  # no table given
    assert seen == [(threading.get_ident(), trio.lowlevel.current_root_task())]
    assert routed["meta"]["served_by"]


async def test_list_backends_shows_backend_state_but_no_keys_or_addresses(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-never-shown-0123456789"
    monkeypatch.setenv("SWARM_MCP_TEST_KEY", secret)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    # (A base_url with user:password@ is refused by the config itself.)
    gone = f"openai:name=gone,base_url=http://127.0.0.1:{closed},retries=0"
    with FakeVLLM(model="base-model") as server:
        llm = f"openai:name=llm,model=base-model,base_url={server.url},flavor=vllm"
        llm += ",key_env=SWARM_MCP_TEST_KEY"
        models = (parse_model_spec(llm), parse_model_spec(gone))
        async with (
            node_factory("n", models=models, http=GatewayConfig()) as node,
            session(node.gateway.url if node.gateway else "") as mcp,
        ):
            backends = await ok(mcp, "list_backends")
            routed = await ok(mcp, "route_inference", model="llm", inputs={"prompt": "hi"})
            answers = json.dumps([backends, await ok(mcp, "swarm_status")])
    [llm_row] = backends["models"]
    assert llm_row["name"] == "llm" and llm_row["runner"] == "openai-compat"
    endpoint = llm_row["state"]["endpoint"]
    assert endpoint["breaker"] == "closed" and endpoint["keys"]
    assert "gone" in backends["failed"] and routed["meta"]["served_by"] == node.peer_id
    assert secret not in answers
    assert server.url not in answers


def test_redact_hides_credentials_in_urls() -> None:
    text = "GET https://user:pw@api.example/v1?api_key=SECRET&x=1 failed; token=abc"
    assert redact({"why": [text]}) == {
        "why": ["GET https://***@api.example/v1?api_key=***&x=1 failed; token=abc"]
    }


def test_daemon_url_comes_from_the_flag_or_the_daemon_state(tmp_path: Path) -> None:
    assert daemon_url(tmp_path, "http://127.0.0.1:8080") == "http://127.0.0.1:8080/mcp"
    assert daemon_url(tmp_path, "http://127.0.0.1:8080/mcp/") == "http://127.0.0.1:8080/mcp"
    with pytest.raises(ConfigError, match="no daemon is running"):
        daemon_url(tmp_path, None)
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "addrs": []}))
    with pytest.raises(ConfigError, match="serves no HTTP gateway"):
        daemon_url(tmp_path, None)
    state = {"pid": os.getpid(), "addrs": [], "http": "http://127.0.0.1:9"}
    (tmp_path / "daemon.json").write_text(json.dumps(state))
    assert daemon_url(tmp_path, None) == "http://127.0.0.1:9/mcp"
    with pytest.raises(ConfigError, match="expected http"):
        daemon_url(tmp_path, "127.0.0.1:8080")


@pytest.mark.slow
async def test_swarm_mcp_on_stdio_forwards_to_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARM_MCP_TOKEN", TOKEN)
    with daemons_under(tmp_path) as daemons:
        daemon = daemons.start(
            "d",
            *("--model", "fake:echo"),
            *("--http", "127.0.0.1:0", "--http-token-env", "SWARM_MCP_TOKEN"),
        )
        await trio.to_thread.run_sync(daemon.wait_ready)
        state = json.loads((daemon.data_dir / "daemon.json").read_text())
        assert state["http"].startswith("http://127.0.0.1:")
        bridge = [sys.executable, "-m", "node.cli", "mcp", "--data-dir", str(daemon.data_dir)]
        # Without the token the daemon refuses, and the bridge says so at start.
        refused = await trio.run_process(
            bridge, stdin=b"", capture_stdout=True, capture_stderr=True, check=False, cwd=REPO
        )
        server = StdioServerParameters(
            command=bridge[0],
            args=[*bridge[1:], "--http-token-env", "SWARM_MCP_TOKEN"],
            env=child_env(),
            cwd=REPO,
        )
        with (tmp_path / "bridge.stderr").open("w") as errlog:
            async with (
                stdio_client(server, errlog=errlog) as (read, write),
                ClientSession(read, write, read_timeout_seconds=CALL_S) as mcp,
            ):
                with trio.fail_after(30):  # a cold interpreter imports numpy, libp2p, the SDK
                    await mcp.initialize()
                tools = {t.name for t in (await mcp.list_tools()).tools}
                routed = await ok(mcp, "route_inference", model="echo", inputs="hello")
                missing = await failed(mcp, "route_inference", model="nope", inputs="x")
                daemon.signal(signal.SIGTERM)  # the daemon goes; the bridge stays and says so
                await trio.to_thread.run_sync(daemon.wait_stopped_cleanly)
                gone = [await failed(mcp, "swarm_status") for _ in range(2)]
    assert [code for code, _ in gone] == ["NOT_EXECUTED"] * 2
    assert "did not answer" in gone[0][1]
    assert refused.returncode == 1 and refused.stdout == b""
    assert b"401" in refused.stderr and b"Traceback" not in refused.stderr
    assert tools == TOOLS
    assert routed["meta"]["served_by"] == daemon.peer_id
    assert missing[0] == "MODEL_NOT_FOUND"


async def test_the_sdk_high_level_client_negotiates_with_mcp(node_factory: NodeFactory) -> None:
    """``mcp.Client`` probes the newest protocol era first; /mcp answers it too."""
    from mcp import Client

    async with swarm(node_factory) as (_, peer, url):
        with trio.fail_after(CALL_S):
            async with Client(f"{url}/mcp") as client:
                names = {t.name for t in (await client.list_tools()).tools}
                result = await client.call_tool("route_inference", {"model": "echo", "inputs": "x"})
                version = client.protocol_version
    assert names == TOOLS
    assert isinstance(result, types.CallToolResult) and not result.is_error
    assert result.structured_content["meta"]["served_by"] == peer.peer_id
    assert version == "2026-07-28"  # the modern era (per-request envelopes), not the handshake
