"""``swarm daemon --http`` as a user runs it: a real process serving the gateway,
stopped by SIGTERM with its port closed; wide binds refused without a token."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import pytest
from conftest import LOOPBACK
from test_daemon_processes import cli, daemons_under

from node.gateway.openai import OPENAI_RUNNER, sampling_params
from runners import generation
from runners.remote import openai_protocol

TOKEN = "cli-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_daemon_serves_http_until_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("SWARM_GW_TOKEN", TOKEN)
    with daemons_under(tmp_path) as daemons:
        daemon = daemons.start(
            "gw",
            *("--model", "fake:echo"),
            *("--http", f"127.0.0.1:{port}", "--http-token-env", "SWARM_GW_TOKEN"),
        ).wait_ready()
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as http:
            health = http.get("/health")
            denied = http.get("/v1/models")
            models = http.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        daemon.signal(signal.SIGTERM)
        daemon.wait_stopped_cleanly()
    assert health.json() == {"status": "ok"}
    assert denied.status_code == 401
    assert [m["id"] for m in models.json()["data"]] == ["echo"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.slow
def test_wide_bind_without_token_is_refused(tmp_path: Path) -> None:
    [done] = cli(
        [
            "daemon",
            *("--listen", LOOPBACK, "--no-cuda-probe", "--no-mdns"),
            *("--data-dir", str(tmp_path / "wide"), "--model", "fake:echo"),
            *("--http", "0.0.0.0:0"),
        ]
    )
    assert done.returncode != 0 and done.stdout == ""
    assert "beyond loopback" in done.stderr and "Traceback" not in done.stderr


def test_max_tokens_goes_to_the_param_each_runner_declares() -> None:
    body = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n"}
    model = {"name": "m", "task": "text-generation"}
    local = sampling_params(body, {**model, "runner": "openvino-genai"})
    remote = sampling_params(body, {**model, "runner": OPENAI_RUNNER})
    assert local["max_new_tokens"] == 7 and "max_tokens" not in local
    assert remote["max_tokens"] == 7 and "max_new_tokens" not in remote
    assert set(local) <= generation.PARAMS
    assert set(remote) <= set(openai_protocol.PARAMS)
    assert local["stop"] == ["\n"]
    newer = sampling_params({"max_completion_tokens": 9}, {"name": "m", "task": "text-generation"})
    assert newer == {"max_new_tokens": 9}
