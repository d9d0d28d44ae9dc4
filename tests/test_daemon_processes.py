"""Real ``swarm`` processes on loopback, driven through the CLI the way a user drives it.

Every daemon is an OS process of its own (``python -m node.cli daemon``) whose
stdout says when it is ready and where it listens; every ``submit`` and
``status`` is one too. Each child is killed in a ``finally`` and every wait is
bounded, so a failing test leaves nothing running and never hangs. A process
costs ~1.5 s to start, so the read-only tests share one three-node swarm (A
forwards to B and C), whose teardown checks that SIGTERM stops each node cleanly.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import trio
from conftest import LOOPBACK

from node.client import SwarmClient
from runners import convert_minilm
from runners.catalog import specs_from_config
from runners.openvino_embed import DIM, MODEL_NAME

# Lines read from a child process and not yet taken; past this the reader thread
# waits (and the child with it) rather than holding an ever-growing backlog.
LINES_BUFFERED = 10_000

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 30.0
STATE_FILE = "daemon.json"
SOCKET_FILE = "daemon.sock"
READY = re.compile(r"swarm node (\S+) ready")
LISTENING = re.compile(r"  listening on (\S+)")
TCP_PORT = re.compile(r"/tcp/(\d+)/")


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def swarm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


# --- one-shot CLI commands -------------------------------------------------------------


@contextmanager
def started(*commands: Sequence[str]) -> Iterator[list[subprocess.Popen[str]]]:
    """``swarm`` commands running side by side; killed and reaped on exit."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for args in commands:
            procs.append(
                subprocess.Popen(
                    swarm_command(*args),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                    env=child_env(),
                )
            )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)  # reaps it and closes its pipes


def finish(
    procs: Sequence[subprocess.Popen[str]], timeout_s: float = CLI_TIMEOUT_S
) -> list[subprocess.CompletedProcess[str]]:
    """Wait for each command (all within ``timeout_s``) and collect its output."""
    deadline = time.monotonic() + timeout_s
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.args} still running after {timeout_s} s")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def cli(*commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``swarm`` commands in parallel; one result per command, in order."""
    with started(*commands) as procs:
        return finish(procs)


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, (
        f"{done.args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )
    return json.loads(done.stdout)


# --- daemons ---------------------------------------------------------------------------


class Daemon:
    """A ``swarm daemon`` process; its stdout lines are read by a thread into a queue."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.with_name(f"{data_dir.name}.stderr")
        self.peer_id = ""
        self.addrs: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue(LINES_BUFFERED)
        # No mDNS: other swarms on this machine (other tests, a demo) must not join ours.
        command = swarm_command(
            "daemon",
            "--listen",
            LOOPBACK,
            "--no-cuda-probe",
            "--no-mdns",
            "--data-dir",
            str(data_dir),
            *args,
        )
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=REPO,
                env=child_env(),
                start_new_session=True,  # its own process group: a converter child dies with it
            )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=_pump, args=(self.proc.stdout, self._lines))
        self._pump.daemon = True
        self._pump.start()

    @property
    def addr(self) -> str:
        return self.addrs[0]

    @property
    def port(self) -> int:
        match = TCP_PORT.search(self.addr)
        assert match, self.addr
        return int(match[1])

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> Daemon:
        """Read the start-up banner: peer id, listen addresses, then what it serves."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(
                    f"daemon {self.data_dir.name} not ready in {timeout_s} s:\n{self.stderr()}"
                )
            if line is None:
                code = self.proc.wait(5)
                pytest.fail(f"daemon {self.data_dir.name} exited {code} early:\n{self.stderr()}")
            if match := READY.fullmatch(line):
                self.peer_id = match[1]
            elif match := LISTENING.fullmatch(line):
                self.addrs.append(match[1])
            elif line.startswith("  serving "):
                break
        assert self.peer_id and self.addrs, "banner lacks the peer id or an address"
        assert all(a.endswith(f"/p2p/{self.peer_id}") for a in self.addrs), self.addrs
        return self

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_stopped_cleanly(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Exit code 0 in time, its port closed, its daemon.json and socket gone."""
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon {self.data_dir.name} still running after {timeout_s} s")
        assert code == 0, f"daemon {self.data_dir.name} exited {code}:\n{self.stderr()}"
        assert "Traceback" not in self.stderr()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        assert not (self.data_dir / STATE_FILE).exists()
        assert not (self.data_dir / SOCKET_FILE).exists()

    def kill(self) -> None:
        """Kill its process group if it still runs; reap it. Safe to call twice."""
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # group id == pid (own session)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._pump.join(5)
        if not self._pump.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


class Daemons:
    """Starts daemons under ``root``; ``close`` kills whichever still run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Daemon] = []

    def start(self, name: str, *args: str) -> Daemon:
        daemon = Daemon(self.root / name, *args)
        self.started.append(daemon)
        return daemon

    def close(self) -> None:
        for daemon in self.started:
            daemon.kill()


@contextmanager
def daemons_under(root: Path) -> Iterator[Daemons]:
    daemons = Daemons(root)
    try:
        yield daemons
    finally:
        daemons.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with daemons_under(tmp_path) as started_daemons:
        yield started_daemons


@dataclass(frozen=True)
class Swarm:
    a: Daemon  # serves nothing, forwards to b and c
    b: Daemon  # echo
    c: Daemon  # other (20 ms)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Three daemons shared by the read-only tests; SIGTERM must stop each cleanly."""
    with daemons_under(tmp_path_factory.mktemp("swarm")) as daemons:
        b = daemons.start("b", "--model", "fake:echo")
        c = daemons.start("c", "--model", "fake:other:20")
        b.wait_ready()
        c.wait_ready()
        a = daemons.start("a", "--no-models", "--peer", b.addr, "--peer", c.addr).wait_ready()
        yield Swarm(a, b, c)
        for daemon in (a, b, c):
            daemon.signal(signal.SIGTERM)
        for daemon in (a, b, c):
            daemon.wait_stopped_cleanly()


# --- a three-node swarm, through the CLI ---------------------------------------------


def test_submit_through_a_is_served_by_the_peer_with_the_model(swarm: Swarm) -> None:
    echo, other = cli(
        ["submit", "--peer", swarm.a.addr, "--json", "echo", "hello"],
        ["submit", "--peer", swarm.a.addr, "--json", "other", "hello"],
    )
    for done, server in ((echo, swarm.b), (other, swarm.c)):
        body = ok_json(done)
        embedding = body["outputs"]["embedding"]
        assert embedding["dtype"] == "float32" and embedding["shape"] == [1, 8]
        assert len(embedding["data"]) == 1 and len(embedding["data"][0]) == 8
        assert body["meta"]["served_by"] == server.peer_id
        assert body["meta"]["forwarded_by"] == swarm.a.peer_id
    # The fake model's output depends on the text alone, whichever peer computes it.
    assert ok_json(echo)["outputs"]["embedding"] == ok_json(other)["outputs"]["embedding"]


def test_unknown_model_exits_1_with_a_typed_error(swarm: Swarm) -> None:
    as_json, as_text = cli(
        ["submit", "--peer", swarm.a.addr, "--json", "nobody-serves-this", "x"],
        ["submit", "--peer", swarm.a.addr, "nobody-serves-this", "x"],
    )
    assert as_json.returncode == 1, as_json.stderr
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == "MODEL_NOT_FOUND"
    assert "nobody-serves-this" in error["message"]
    assert as_text.returncode == 1
    assert as_text.stdout == ""
    assert "MODEL_NOT_FOUND" in as_text.stderr and "Traceback" not in as_text.stderr


def test_stream_prints_chunks_as_they_come(swarm: Swarm) -> None:
    as_json, as_text = cli(
        [
            "submit",
            "--peer",
            swarm.a.addr,
            "--stream",
            "--json",
            "--param",
            "chunks=4",
            "echo",
            "hi",
        ],
        ["submit", "--peer", swarm.a.addr, "--stream", "echo", "hi"],
    )
    assert as_json.returncode == 0, as_json.stderr
    *chunks, last = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [c["chunk"] for c in chunks] == [0, 1, 2, 3]
    assert all(isinstance(c["outputs"]["text"], str) for c in chunks)
    assert last["meta"]["chunks"] == 4
    assert last["meta"]["served_by"] == swarm.b.peer_id
    assert last["meta"]["forwarded_by"] == swarm.a.peer_id

    assert as_text.returncode == 0, as_text.stderr
    words = "".join(c["outputs"]["text"] for c in chunks[:3])  # the same text: the same words
    assert as_text.stdout.startswith(words)
    assert f"served by {swarm.b.peer_id}" in as_text.stdout


def test_status_of_a_lists_both_peers(swarm: Swarm) -> None:
    by_peer, by_data_dir, as_text = cli(
        ["status", "--peer", swarm.a.addr, "--json"],
        ["status", "--data-dir", str(swarm.a.data_dir), "--json"],  # found through daemon.json
        ["status", "--data-dir", str(swarm.a.data_dir)],
    )
    record = ok_json(by_peer)
    assert record["peer_id"] == swarm.a.peer_id
    assert record["models"] == []
    peers = {p["peer_id"]: p for p in record["view"]["peers"]}
    assert set(peers) == {swarm.b.peer_id, swarm.c.peer_id}
    assert peers[swarm.b.peer_id]["models"] == ["echo"]
    assert peers[swarm.c.peer_id]["models"] == ["other"]
    assert all(p["status"] == "linked" for p in peers.values())

    local = ok_json(by_data_dir)
    assert local["peer_id"] == swarm.a.peer_id
    assert {p["peer_id"] for p in local["view"]["peers"]} == set(peers)

    assert as_text.returncode == 0, as_text.stderr
    assert re.search(rf"^node +{swarm.a.peer_id}$", as_text.stdout, re.M), as_text.stdout
    assert re.search(r"^peers +2 linked, links 2/32, 0 more known", as_text.stdout, re.M), (
        as_text.stdout
    )


def test_peers_lists_the_table_and_filters_by_model(swarm: Swarm) -> None:
    everyone, echo, as_text = cli(
        ["peers", "--peer", swarm.a.addr, "--json"],
        ["peers", "--peer", swarm.a.addr, "--model", "ECHO", "--json"],
        ["peers", "--peer", swarm.a.addr],
    )
    rows = ok_json(everyone)["peers"]
    assert {r["peer_id"] for r in rows} == {swarm.b.peer_id, swarm.c.peer_id}
    assert all("bootstrap" in r["found_by"] and r["addrs"] for r in rows)
    assert [r["peer_id"] for r in ok_json(echo)["peers"]] == [swarm.b.peer_id]
    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    assert lines[0].split()[:5] == ["PEER", "STATUS", "PATH", "FOUND", "BY"]
    assert any(swarm.b.peer_id[-12:] in line and "echo" in line for line in lines)


# --- shutdown and identity -----------------------------------------------------------


def in_flight(address: str) -> int:
    """The node's own count of requests it is working on, from its capability record."""

    async def ask() -> int:
        async with SwarmClient.connect(address) as client:
            record = await client.record()
        return int(record.body["load"]["in_flight"])

    return trio.run(ask)


def test_sigterm_answers_the_request_in_flight_then_exits(daemons: Daemons) -> None:
    node = daemons.start("slow", "--model", "fake:slow:1500").wait_ready()
    with started(["submit", "--peer", node.addr, "--json", "slow", "hello"]) as (submit,):
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while in_flight(node.addr) == 0:
            assert submit.poll() is None, "the submit ended before its request was seen"
            assert time.monotonic() < deadline, "the request never reached the node"
            time.sleep(0.05)
        node.signal(signal.SIGTERM)
        (done,) = finish([submit])
    body = ok_json(done)
    assert body["meta"]["served_by"] == node.peer_id
    assert body["outputs"]["embedding"]["shape"] == [1, 8]
    node.wait_stopped_cleanly()
    assert "got SIGTERM" in node.stderr()


def test_sigint_stops_cleanly_and_a_restart_keeps_the_peer_id(daemons: Daemons) -> None:
    first = daemons.start("n", "--model", "fake:echo").wait_ready()
    assert (first.data_dir / STATE_FILE).exists()
    first.signal(signal.SIGINT)
    first.wait_stopped_cleanly()
    assert "got SIGINT" in first.stderr()

    again = daemons.start("n", "--model", "fake:echo").wait_ready()
    assert again.peer_id == first.peer_id
    state = json.loads((again.data_dir / STATE_FILE).read_text())
    assert state["peer_id"] == again.peer_id and state["addrs"] == again.addrs
    assert state["pid"] == again.proc.pid
    again.signal(signal.SIGTERM)
    again.wait_stopped_cleanly()


def peer_ids(address: str) -> set[str]:
    """The linked peers of the node at ``address``, as ``swarm peers --json`` lists them."""
    (done,) = cli(["peers", "--peer", address, "--json"])
    return {r["peer_id"] for r in ok_json(done)["peers"] if r["status"] == "linked"}


def test_a_killed_peer_is_dropped_within_the_bound_and_back_after_restart(
    daemons: Daemons,
) -> None:
    fast = ("--heartbeat", "0.5", "--dead-after", "2")
    a = daemons.start("a", "--no-models", *fast).wait_ready()
    b = daemons.start("b", "--model", "fake:echo", "--peer", a.addr, *fast).wait_ready()
    assert b.peer_id in peer_ids(a.addr)
    os.kill(b.proc.pid, signal.SIGKILL)  # no goodbye, no closed connections
    b.proc.wait(timeout=5)
    killed = time.monotonic()
    # Dropped after dead-after (2 s) plus a heartbeat round and the table's 1 s tick; the
    # bound here is loose because each poll is a CLI process on a busy CI machine (the
    # drop time itself is measured by scripts/bench_discovery).
    while b.peer_id in peer_ids(a.addr):
        assert time.monotonic() - killed < 15, "the dead peer stayed in the table"
        time.sleep(0.2)

    again = daemons.start("b", "--model", "fake:echo", *fast).wait_ready()  # peerstore redials a
    assert again.peer_id == b.peer_id
    back = time.monotonic()
    while b.peer_id not in peer_ids(a.addr):
        assert time.monotonic() - back < 15, "the restarted peer did not come back"
        time.sleep(0.2)


# --- the real default model ----------------------------------------------------------


def link_cache(models_dir: Path, data_dir: Path) -> Path:
    """Give ``data_dir`` the session's converted model (hard links: no copy, no reconversion).

    Returns the entry's model.xml. The daemon may prune or discard entries in its own
    models dir; with links that never touches the shared cache.
    """
    target = data_dir / "models" / MODEL_NAME
    target.parent.mkdir(parents=True)
    shutil.copytree(models_dir / MODEL_NAME, target, copy_function=os.link)
    (xml,) = target.glob(f"*/{convert_minilm.XML}")
    return xml


def test_default_model_in_a_daemon_matches_sentence_transformers(
    daemons: Daemons, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xml = link_cache(models_dir, daemons.root / "real")
    before = xml.stat()
    node = daemons.start("real")  # no --model: the default, all-MiniLM-L6-v2

    # Load the reference while the daemon starts.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    texts = ["The quick brown fox jumps over the lazy dog.", "A swarm serves inference."]
    model = SentenceTransformer(str(convert_minilm.model_dir()), device="cpu")
    reference = np.asarray(model.encode(texts), dtype=np.float32)

    node.wait_ready(timeout_s=20)  # far less than a conversion takes
    assert "converting" not in node.stderr()
    after = xml.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    (done,) = cli(["submit", "--peer", node.addr, "--json", MODEL_NAME, *texts])
    body = ok_json(done)
    embedding = body["outputs"]["embedding"]
    assert embedding["dtype"] == "float32" and embedding["shape"] == [len(texts), DIM]
    assert body["meta"]["served_by"] == node.peer_id
    got = np.asarray(embedding["data"], dtype=np.float32)
    cosine = np.sum(got * reference, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() > 0.999, cosine

    node.signal(signal.SIGTERM)
    node.wait_stopped_cleanly()


# --- bad input on the command line ---------------------------------------------------


def test_bad_cli_input_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    data_dir = tmp_path / "bad"
    bad_peer, bad_model = cli(
        ["submit", "--peer", "not-a-multiaddr", "echo", "x"],
        [
            "daemon",
            *("--listen", LOOPBACK, "--no-cuda-probe", "--data-dir", str(data_dir)),
            *("--model", "nonsense"),
        ],
    )
    assert bad_peer.returncode == 2, bad_peer.stderr
    assert "'not-a-multiaddr' is not a peer address" in bad_peer.stderr
    assert "Traceback" not in bad_peer.stderr

    assert bad_model.returncode != 0
    assert bad_model.stdout == ""  # never said it was ready
    assert "unknown model 'nonsense'" in bad_model.stderr
    assert f"available: {MODEL_NAME}" in bad_model.stderr and "fake:NAME" in bad_model.stderr
    assert "Traceback" not in bad_model.stderr
    assert not (data_dir / STATE_FILE).exists()


def test_bad_config_files_are_refused_naming_the_field(tmp_path: Path) -> None:
    files = {
        "router.toml": '[router]\nstrategy = "fastest"\n',
        "model.toml": '[[models]]\nkind = "openvino-classify"\nprecison = "int8"\n',
        "table.toml": "[routers]\nstrategy = 1\n",
        "syntax.toml": "[[models]\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    daemon = ["daemon", "--listen", LOOPBACK, "--no-cuda-probe", "--data-dir", str(tmp_path)]
    done = cli(*([*daemon, "--config", str(tmp_path / name)] for name in files))
    messages = {name: d.stderr for name, d in zip(files, done, strict=True)}
    assert all(d.returncode == 2 and d.stdout == "" for d in done), messages
    assert "router.toml: router" in messages["router.toml"]
    assert "fastest" in messages["router.toml"]
    assert "models[0]: unknown field(s) precison" in messages["model.toml"]
    assert "unknown table(s) routers" in messages["table.toml"]
    assert "cannot read" in messages["syntax.toml"]
    assert not any("Traceback" in m for m in messages.values())


def test_init_writes_a_config_the_daemon_accepts(tmp_path: Path) -> None:
    (first,) = cli(["init", "--data-dir", str(tmp_path)])
    assert first.returncode == 0, first.stderr
    path = tmp_path / "config.toml"
    specs = specs_from_config(tomllib.loads(path.read_text()), str(path))
    assert [s.kind for s in specs] == ["openvino-embed"]
    (again,) = cli(["init", "--data-dir", str(tmp_path)])
    assert again.returncode == 2 and "exists" in again.stderr
    (forced,) = cli(["init", "--data-dir", str(tmp_path), "--force"])
    assert forced.returncode == 0


def test_models_lists_what_the_swarm_serves(swarm: Swarm) -> None:
    (done,) = cli(["models", "--json", "--peer", swarm.a.addr])
    rows = {r["model"]: r for r in ok_json(done)["models"]}
    assert rows["echo"]["local"] is None and rows["echo"]["peers"] == [swarm.b.peer_id]
    assert rows["other"]["peers"] == [swarm.c.peer_id]
