"""The CLI as a user runs it, as processes: the gateway on by default (several nodes on
one machine share 127.0.0.1:8470 by falling back to free ports), its URL in
``swarm status``, the tables and ``--json`` of status/peers/models, config.toml
read by a real daemon, and a busy explicit port refused."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LOOPBACK
from test_daemon_processes import Daemon, Daemons, cli, daemons_under, ok_json

from node.cli.config_file import DEFAULT_HTTP

pytestmark = pytest.mark.slow
DEFAULT_PORT = int(DEFAULT_HTTP.rpartition(":")[2])
FELL_BACK = "is in use (another node?); taking a free port"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with daemons_under(tmp_path) as started:
        yield started


def gateway_of(daemon: Daemon) -> str | None:
    state = json.loads((daemon.data_dir / "daemon.json").read_text())
    url: str | None = state["http"]
    return url


def text_ok(done: subprocess.CompletedProcess[str]) -> list[str]:
    """A table command's lines: exit 0, no colour codes (stdout is a pipe), 80 columns."""
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr}"
    assert "\x1b" not in done.stdout
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout
    return [" ".join(line.split()) for line in done.stdout.splitlines()]


def test_gateways_by_default_and_what_status_peers_models_show(daemons: Daemons) -> None:
    a = daemons.start("a", "--model", "fake:echo").wait_ready()
    b = daemons.start("b", "--model", "fake:other", "--peer", a.addr).wait_ready()
    urls = {gateway_of(a), gateway_of(b)}
    assert len(urls) == 2, urls  # two nodes, two ports
    for daemon in (a, b):
        url = gateway_of(daemon)
        assert url is not None and url.startswith("http://127.0.0.1:")
        # 8470 unless another node (the other one, or one outside this test) held it.
        assert url.endswith(f":{DEFAULT_PORT}") or FELL_BACK in daemon.stderr(), url
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}

    home = ("--data-dir", str(b.data_dir))
    status, status_json, peers, peers_json, models, models_json = cli(
        ["status", *home],
        ["status", *home, "--json"],
        ["peers", *home],
        ["peers", *home, "--json"],
        ["models", *home],
        ["models", *home, "--json"],
    )
    lines = text_ok(status)
    assert f"node {b.peer_id}" in lines and f"gateway {gateway_of(b)}" in lines
    record = ok_json(status_json)
    assert (record["peer_id"], record["gateway"]) == (b.peer_id, gateway_of(b))
    assert {"seq", "addrs", "hardware", "models", "load", "view"} <= set(record)

    lines = text_ok(peers)
    assert lines[0].split()[:3] == ["PEER", "STATUS", "PATH"]
    assert any(line.startswith(f"{a.peer_id[-12:]} linked") for line in lines), lines
    listed = ok_json(peers_json)
    assert set(listed) == {"peer_id", "peers"} and listed["peer_id"] == b.peer_id
    assert [p["peer_id"] for p in listed["peers"]] == [a.peer_id]

    lines = text_ok(models)
    # (fake models have no content: CONTENT and SIZE "-", no providers)
    assert f"echo - 1: {a.peer_id[-8:]} - - 0" in lines, lines
    assert "other fake fake/none 0 - - 0" in lines, lines
    listed = ok_json(models_json)
    assert set(listed) == {"peer_id", "models"}
    rows = {r["model"]: r for r in listed["models"]}
    fields = {"model", "local", "peers", "content", "size", "providers"}
    assert all(set(r) == fields for r in rows.values())
    assert rows["echo"]["peers"] == [a.peer_id] and rows["other"]["local"]["runner"] == "fake"
    assert all(r["content"] is None and r["providers"] == 0 for r in rows.values())


def test_config_file_sets_the_daemon_and_turns_the_gateway_off(daemons: Daemons) -> None:
    data_dir = daemons.root / "conf"
    data_dir.mkdir(parents=True)
    (data_dir / "config.toml").write_text(
        f'[node]\nlisten = ["{LOOPBACK}"]\ndht = false\n\n[http]\nlisten = "off"\n\n'
        '[router]\nstrategy = "round-robin"\n\n[[models]]\nkind = "fake"\nname = "echo"\n'
    )
    node = daemons.start("conf").wait_ready()  # no --model: the file's model
    assert gateway_of(node) is None
    status, as_text = cli(
        ["status", "--data-dir", str(data_dir), "--json"], ["status", "--data-dir", str(data_dir)]
    )
    record = ok_json(status)
    assert record["gateway"] is None
    assert [m["name"] for m in record["models"]] == ["echo"]
    assert not any(line.startswith("gateway") for line in text_ok(as_text))
    assert record["view"]["routing"]["strategy"] == "round-robin"


def test_a_busy_explicit_port_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "config.toml").write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n')
        base = ["daemon", "--listen", LOOPBACK, "--no-cuda-probe", "--no-mdns", "--no-dht"]
        base += ["--model", "fake:echo"]
        flag, file = cli(
            [*base, "--data-dir", str(tmp_path / "a"), "--http", f"127.0.0.1:{port}"],
            [*base, "--data-dir", str(tmp_path / "f")],  # the port from its config.toml
        )
    for done in (flag, file):
        assert done.returncode == 2, done.stderr
        assert re.search(rf"127\.0\.0\.1:{port} is in use", done.stderr), done.stderr
        assert "Traceback" not in done.stderr and "ready" not in done.stdout


def test_a_second_daemon_on_a_held_libp2p_port_refuses_to_start(daemons: Daemons) -> None:
    """py-libp2p listens with SO_REUSEPORT: without our check a second daemon on the
    same port started and the kernel split inbound connections between the two."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    first = daemons.start("first", "--model", "fake:echo", "--listen", listen).wait_ready()
    base = ["daemon", "--listen", listen, "--no-cuda-probe", "--no-mdns", "--no-dht"]
    (second,) = cli([*base, "--data-dir", str(first.data_dir.parent / "second"), "--http", "off"])
    assert second.returncode == 2, second.stderr
    assert f"port {port} is held by" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and "ready" not in second.stdout
    # The first one serves on, every connection its own.
    (done,) = cli(["submit", "--peer", first.addr, "--json", "echo", "hi"])
    assert ok_json(done)["meta"]["served_by"] == first.peer_id
