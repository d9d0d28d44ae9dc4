"""The tables of ``swarm status``, ``peers`` and ``models``, drawn from real nodes' data,
and the gateway's default-port fallback, in process (test_cli_gateway.py: as processes)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import trio
from conftest import NodeFactory

from node.cli.render import model_rows, models_text, peers_text, status_text
from node.data_dir import STATE_FILE, read_state
from node.errors import sole_error
from node.gateway import GatewayConfig
from node.reach.records import FORWARDED_WHY
from protocols.errors import ConfigError

WIDTH = 80


def plain(text: str) -> list[str]:
    """Lines with their spacing collapsed (the widths are the table's business)."""
    assert "\x1b" not in text, "colour codes in output meant for a pipe"
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    return [" ".join(line.split()) for line in text.splitlines()]


async def test_tables_show_a_real_node_and_its_peer(node_factory: NodeFactory) -> None:
    async with (
        node_factory("b", models=("fake:echo",)) as b,
        node_factory("a", models=("fake:other",), peers=(b.addrs[0],)) as a,
    ):
        body = a.status()  # what `swarm status --json` prints
    peer_id = body.pop("peer_id")
    body.pop("seq")

    status = plain(status_text(peer_id, body, "http://127.0.0.1:8470"))
    assert f"node {a.peer_id}" in status
    assert "gateway http://127.0.0.1:8470" in status
    assert "peers 1 known, 1 linked ('swarm peers' lists them)" in status
    assert "fairness on, 0 peers tracked, 0 refused, over budget: none" in status
    assert any(line.startswith("other fake fake none") for line in status), status

    text = peers_text(body["view"]["peers"], {})
    peers = plain(text)
    assert peers[0] == "PEER STATUS PATH FOUND BY MODELS RUN/Q ADDRESS"
    [row] = [line for line in peers if line.startswith(b.peer_id[-12:])]
    # Linked over a loopback connection of its own: a direct path.
    assert row.split()[1:4] == ["linked", "direct", "bootstrap"] and "echo" in row.split()
    assert {r["peer_id"]: r["path"] for r in body["view"]["peers"]} == {b.peer_id: "direct"}
    # The address column shows b's address as host:port (the peer id is in the row).
    raw = text.splitlines()
    column = raw[0].index("ADDRESS")
    address = "".join(line[column:].strip() for line in raw[2:])
    port = b.addrs[0].split("/tcp/")[1].partition("/")[0]
    assert address == f"127.0.0.1:{port}"

    models = plain(models_text(model_rows(body)))
    assert models[0] == "MODEL HERE PEERS CONTENT SIZE PROVIDERS"
    assert f"echo - 1: {b.peer_id[-8:]} - - 0" in models
    assert "other fake fake/none 0 - - 0" in models


def test_peers_not_linked_get_a_note_and_records_print_as_written() -> None:
    """Text from peers' records is shown as it is: rich markup and :emoji: codes are
    not interpreted (an IPv6 address holds such codes)."""
    rows = [
        {
            "peer_id": "12D3KooWabcdefabcdefabcdef",
            "status": "unreachable",
            "reason": "dial timed out",
            "found_by": ["mdns", "peerstore"],
            "seen_ago_s": 1200,
            "models": ["[bold]x[/bold]", "all-minilm-l6-v2"],
            "addrs": ["/ip6/2001:db8:85a3:1234:5678:8a2e:370:7334/tcp/7420/p2p/12D3KooWabc"],
        }
    ]
    text = peers_text(rows, {})
    lines = plain(text)
    assert lines[2].split()[:6] == [
        "abcdefabcdef", "unreachable", "-", "mdns", "[bold]x[/bold]", "-"
    ]  # fmt: skip
    assert lines[3].split()[:2] == ["peerstore", "all-minilm-l6-v2"]  # one name a line
    assert "abcdefabcdef unreachable, last heard 20m ago: dial timed out" in lines
    assert "[bold]x[/bold]" in text
    raw = text.splitlines()
    column = raw[0].index("ADDRESS")
    folded = "".join(line[column:].strip() for line in raw[2:-1])
    assert folded == "[2001:db8:85a3:1234:5678:8a2e:370:7334]:7420"


def test_empty_tables_say_so() -> None:
    forwarder = plain(status_text("me", {"models": [], "view": {"peers": []}}))
    assert "models none here (forwarding only)" in forwarder and "MODEL" not in str(forwarder)
    # No daemon: the machine's hardware only, no peers or models to speak of.
    machine = plain(status_text("(not running)", {"hardware": {"cpu": {"model": "X"}}}))
    assert machine[0] == "node (not running)" and not any(
        line.startswith(("peers", "models")) for line in machine
    )
    assert peers_text([], {"dht": "no seeds"}) == "no peers known\ndiscovery dht: no seeds"
    assert models_text([]) == "no models served by this node or its linked peers"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other program listens on, for the test's length."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_gateway_falls_back_to_a_free_port_only_when_allowed(
    node_factory: NodeFactory, busy_port: int
) -> None:
    http = GatewayConfig(port=busy_port)
    fake = ("fake:echo",)  # not the default model: its first-run conversion takes seconds
    async with node_factory("fallback", models=fake, http=http, http_fallback=True) as node:
        assert node.gateway is not None
        url = node.gateway.url
        assert url.startswith("http://127.0.0.1:") and not url.endswith(f":{busy_port}")
        state = read_state(node.config.data_dir)
        assert state is not None and state["http"] == url  # where `swarm status` finds it
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await stream.aclose()

    with pytest.raises(BaseException) as raised:  # a group from the nursery; its member below
        async with node_factory("strict", models=fake, http=http) as _:
            pass
    error = sole_error(raised.value)
    assert isinstance(error, ConfigError), repr(raised.value)
    assert f"127.0.0.1:{busy_port} is in use" in str(error)


async def test_state_file_says_when_the_gateway_is_off(node_factory: NodeFactory) -> None:
    async with node_factory("off", models=("fake:echo",)) as node:
        state = json.loads((node.config.data_dir / STATE_FILE).read_text())
    assert state["http"] is None and state["peer_id"] == node.peer_id


def test_status_says_whether_the_node_is_reachable_and_why_jobs_are_slower() -> None:
    """The reach rows of a node behind a NAT with no relay: not dialable, no address
    announced, and a model reached only through a peer, with the reason."""
    m = "12D3KooWIntermediaryPeerAbcdefgh"
    body = {
        "addrs": [],
        "hardware": {},
        "view": {
            "peers": [],
            "reach": {
                "reach": "private",
                "why": "behind a NAT: 0000peer sees us at 10.88.0.11 and could not dial "
                "10.88.0.11:7420 back",
                "relays_held": [],
                "relay_offered": False,
                "forwarding": {"echo": {"via": [m], "why": FORWARDED_WHY}},
                "forwarded_jobs": 2,
                "asked": {"answers": 2, "no_answer": 0},
                "dialbacks": {"dials_ok": 1, "dials_failed": 0, "refused": 3},
            },
        },
    }
    text = status_text("12D3KooWself", body)
    lines = plain(text)
    joined = " ".join(lines)
    assert "reach private: behind a NAT: 0000peer sees us at 10.88.0.11" in joined
    assert "address none announced (peers outside the LAN cannot dial this node)" in lines
    assert "relays none held" in lines
    assert f"indirect echo via {m[-8:]}: no provider of it is linked here" in joined
    assert "2 job(s) answered through another peer" in lines
    assert "dialback 2 answered us, 0 unanswered; for peers 1 reached, 0 not, 3 refused" in (joined)
    public = {**body, "addrs": ["/ip4/10.88.0.2/tcp/7420/p2p/12D3KooWself"]}
    public["view"] = {
        "peers": [],
        "reach": {
            "reach": "public",
            "why": "dialled back",
            "relays": {"held": [{"relay": "12D3KooWrelayOne"}]},  # the relay manager's view
            "relay_offered": True,
        },
    }
    lines = plain(status_text("12D3KooWself", public))
    assert "address /ip4/10.88.0.2/tcp/7420/p2p/12D3KooWself" in lines
    assert "relays relayOne held, offering one to peers" in lines
    assert not any(line.startswith("indirect") for line in lines)
