"""``swarm submit/status/peers/models`` without --peer reach the daemon of their data
dir on its local socket, as processes: the same output as through libp2p, no
libp2p imported, the daemon's allow-list applied to them, a socket left by a
killed daemon replaced at its restart, and libp2p used when there is no socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon_processes import REPO, Daemon, Daemons, child_env, cli, daemons_under, ok_json

pytestmark = pytest.mark.slow
SOCKET = "daemon.sock"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with daemons_under(tmp_path) as started:
        yield started


def submit_importing(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``swarm submit ARGS`` under ``-X importtime``: its result and the packages it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "node.cli", "submit", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=60,
    )
    packages = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return done, packages


def without_import_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("import time:"))


def test_submit_and_status_over_the_socket_equal_libp2p(daemons: Daemons) -> None:
    b = daemons.start("b", "--model", "fake:echo", "--http", "off").wait_ready()
    a = daemons.start("a", "--no-models", "--peer", b.addr, "--http", "off").wait_ready()
    home = ("--data-dir", str(a.data_dir))
    state = json.loads((a.data_dir / "daemon.json").read_text())
    assert state["socket"] == str(a.data_dir / SOCKET)

    (here, imported), (there, _) = (
        submit_importing(*home, "--json", "echo", "hello"),
        submit_importing(*home, "--peer", a.addr, "--json", "echo", "hello"),
    )
    assert "libp2p" not in imported and "torch" not in imported, sorted(imported)
    local, remote = (json.loads(without_import_lines(d.stdout)) for d in (here, there))
    assert local["outputs"] == remote["outputs"]
    assert local["meta"]["served_by"] == remote["meta"]["served_by"] == b.peer_id
    assert local["meta"]["forwarded_by"] == remote["meta"]["forwarded_by"] == a.peer_id
    assert set(local["meta"]) == set(remote["meta"])

    status, status_peer, peers, peers_peer, models, models_peer, text = cli(
        ["status", *home, "--json"],
        ["status", *home, "--peer", a.addr, "--json"],
        ["peers", *home, "--json"],
        ["peers", *home, "--peer", a.addr, "--json"],
        ["models", *home, "--json"],
        ["models", *home, "--peer", a.addr, "--json"],
        ["status", *home],
    )
    mine, theirs = ok_json(status), ok_json(status_peer)
    assert list(mine) == list(theirs) and mine["peer_id"] == a.peer_id
    assert list(mine["view"]) == list(theirs["view"])
    assert mine["gateway"] is None and theirs["gateway"] is None  # --http off
    # The same rows (their times move on between the two asks).
    for one, other in ((peers, peers_peer), (models, models_peer)):
        rows, same = ok_json(one), ok_json(other)
        assert list(rows) == list(same) and rows["peer_id"] == same["peer_id"] == a.peer_id
        kind = "peers" if "peers" in rows else "models"
        assert [sorted(r) for r in rows[kind]] == [sorted(r) for r in same[kind]]
        key = "peer_id" if kind == "peers" else "model"
        assert [r[key] for r in rows[kind]] == [r[key] for r in same[kind]]
    assert [p["peer_id"] for p in ok_json(peers)["peers"]] == [b.peer_id]
    assert text.returncode == 0 and f"node      {a.peer_id}" in text.stdout, text.stdout


def test_the_allow_list_holds_for_the_local_cli(daemons: Daemons) -> None:
    data_dir = daemons.root / "closed"
    (ids,) = cli(["id", "--data-dir", str(data_dir), "--json"])
    client = ok_json(ids)["client"]
    other = ok_json(cli(["id", "--data-dir", str(daemons.root / "other"), "--json"])[0])["client"]

    node = daemons.start("closed", "--model", "fake:echo", "--allow", other).wait_ready()
    home = ("--data-dir", str(data_dir))
    job, job_json, status = cli(
        ["submit", *home, "echo", "x"], ["submit", *home, "--json", "echo", "x"], ["status", *home]
    )
    assert job.returncode == 1 and "error UNAUTHORIZED" in job.stderr, job.stderr
    assert json.loads(job_json.stdout)["error"]["code"] == "UNAUTHORIZED"
    assert status.returncode == 1 and "[UNAUTHORIZED]" in status.stderr, status.stderr
    assert "Traceback" not in job.stderr + status.stderr
    node.signal(signal.SIGTERM)
    node.wait_stopped_cleanly()  # its socket gone too

    again = daemons.start("closed", "--model", "fake:echo", "--allow", client).wait_ready()
    (done,) = cli(["submit", *home, "--json", "echo", "x"])
    assert ok_json(done)["meta"]["served_by"] == again.peer_id
    again.signal(signal.SIGTERM)
    again.wait_stopped_cleanly()


def test_a_killed_daemons_socket_is_replaced_and_no_socket_means_libp2p(
    daemons: Daemons,
) -> None:
    first = daemons.start("n", "--model", "fake:echo", "--http", "off").wait_ready()
    path = first.data_dir / SOCKET
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(5)
    assert path.is_socket()  # left behind, nobody listening

    again: Daemon = daemons.start("n", "--model", "fake:echo", "--http", "off").wait_ready()
    home = ("--data-dir", str(again.data_dir))
    (done,) = cli(["submit", *home, "--json", "echo", "x"])
    assert ok_json(done)["meta"]["served_by"] == again.peer_id

    # A daemon.json naming no socket (an older daemon): the CLI goes through libp2p.
    state = json.loads((again.data_dir / "daemon.json").read_text())
    (again.data_dir / "daemon.json").write_text(json.dumps({**state, "socket": None}))
    (done,) = cli(["submit", *home, "--json", "echo", "x"])
    assert ok_json(done)["meta"]["served_by"] == again.peer_id
    # And one naming a socket that does not answer: libp2p too (nothing was sent on it).
    gone = str(Path(again.data_dir, "nothing-here.sock"))
    (again.data_dir / "daemon.json").write_text(json.dumps({**state, "socket": gone}))
    (done,) = cli(["submit", *home, "--json", "echo", "x"])
    assert ok_json(done)["meta"]["served_by"] == again.peer_id
    (again.data_dir / "daemon.json").write_text(json.dumps(state))
    again.signal(signal.SIGTERM)
    again.wait_stopped_cleanly()
