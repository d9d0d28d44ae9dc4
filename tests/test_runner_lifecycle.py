"""Every runner built is closed, loaded or not: what ``load`` and ``close`` leave behind.

A runner whose ``load`` fails, or is cancelled midway, must leave nothing it
started: no open HTTP client (observed on the real httpx transport the
endpoint closes), no container (observed through FakeDocker, a real program
standing in for the docker client, which logs every call). ``close`` is safe
whether ``load`` ran, failed, was cancelled or never ran, and twice; wrappers
(batching, container) hand it to the runner inside in every case.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fake_backend import FakeBackend, Reply
from fake_docker import FakeDocker
from fake_ovms import MODEL, FakeOVMS

from protocols.config import Table
from runners.base import Runner
from runners.batching import BatchConfig, BatchingRunner
from runners.errors import ModelLoadError, ModelNotFound
from runners.remote.contained import ContainedRunner
from runners.remote.container import ContainerConfig
from runners.remote.openai_compat import OpenAICompatConfig, build_runner
from runners.remote.ovms import OVMSConfig, OVMSRunner
from runners.torch_classify import TorchClassifyRunner
from runners.torch_device import Resolved, TorchPlacement, build_on, resolve
from runners.torch_embed import TorchEmbedRunner
from runners.torch_generate import TorchGenerateRunner
from runners.torch_stage import LayerRange, TorchStageConfig, TorchStageRunner


class Watched(httpx.AsyncHTTPTransport):
    """A real transport that remembers being closed (the endpoint's client closes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


def ovms_config(url: str, model: str = MODEL, **fields: Any) -> OVMSConfig:
    table = Table({"name": "ovms", "base_url": url, "model": model, "retries": 0, **fields}, "m")
    config = OVMSConfig.from_table(table)
    table.done()
    return config


def port_of(url: str) -> int:
    port = httpx.URL(url).port
    assert port is not None
    return port


def container(url: str, **fields: Any) -> ContainerConfig:
    base: dict[str, Any] = {
        "kind": "ovms",
        "name": "swarm-test-ovms",
        "model_name": MODEL,
        "host_port": port_of(url),
        "model_path": "/srv/models/affine",
        "ready_timeout_s": 0.3,
    }
    return ContainerConfig(**{**base, **fields})


# -- OVMS: a failed load closes its endpoint ------------------------------------------


@pytest.mark.parametrize(
    ("api", "path", "reply", "error"),
    [
        ("kserve", f"/v2/models/{MODEL}", Reply(500, {"error": "boom"}), ModelLoadError),
        ("kserve", f"/v2/models/{MODEL}/ready", Reply(404, {"error": "gone"}), ModelNotFound),
        ("tfserving", f"/v1/models/{MODEL}/metadata", Reply(200, {"x": 1}), ModelLoadError),
        ("tfserving", f"/v1/models/{MODEL}", Reply(500, {"error": "boom"}), ModelLoadError),
    ],
)
async def test_ovms_failed_load_closes_its_endpoint(
    api: str, path: str, reply: Reply, error: type[Exception]
) -> None:
    with FakeOVMS() as ovms:
        ovms.plan(path, reply)
        transport = Watched()
        runner = OVMSRunner(ovms_config(ovms.url, api=api), transport=transport)
        with pytest.raises(error):
            await runner.load()
        assert transport.closed  # before any close: the failed load let go of it
        assert runner.status()["loaded"] is False
        await runner.close()
        await runner.close()


async def test_ovms_load_without_an_available_version_closes_its_endpoint() -> None:
    with FakeOVMS() as ovms:
        transport = Watched()
        runner = OVMSRunner(ovms_config(ovms.url, "warming", api="tfserving"), transport=transport)
        with pytest.raises(ModelLoadError, match="LOADING"):
            await runner.load()
        assert transport.closed


async def test_ovms_load_cancelled_midway_closes_its_endpoint() -> None:
    with FakeOVMS() as ovms:
        ovms.plan(f"/v2/models/{MODEL}", Reply(kind="hang"))
        transport = Watched()
        runner = OVMSRunner(ovms_config(ovms.url), transport=transport)
        with trio.move_on_after(0.5) as scope:
            await runner.load()
        assert scope.cancelled_caught
        assert transport.closed
        await runner.close()


async def test_ovms_loads_again_after_a_failed_load() -> None:
    with FakeOVMS() as ovms:
        ovms.plan(f"/v2/models/{MODEL}", Reply(500, {"error": "boom"}))
        runner = OVMSRunner(ovms_config(ovms.url))
        with pytest.raises(ModelLoadError):
            await runner.load()
        await runner.load()  # a fresh endpoint, not the closed one
        try:
            assert runner.status()["loaded"] is True
            assert runner.status()["endpoint"]["breaker"] == "closed"
        finally:
            await runner.close()
        assert runner.status()["loaded"] is False


# -- container mode: a failed load stops the container it started ---------------------


def after_run(docker: FakeDocker) -> list[str]:
    commands = docker.commands()
    assert commands[:2] == ["info", "run"], commands
    return commands[2:]


async def test_container_whose_health_wait_fails_is_stopped_and_removed(tmp_path: Path) -> None:
    docker = FakeDocker(tmp_path)
    with FakeBackend() as server:  # no routes: the health route answers 404, never ready
        transport = Watched()
        inner = OVMSRunner(ovms_config(server.url), transport=transport)
        runner = ContainedRunner(inner, container(server.url), engine=docker.engine)
        with pytest.raises(ModelLoadError, match=r"not ready after 0.3 s \(HTTP 404\)"):
            await runner.load()
        assert after_run(docker) == ["stop", "rm"]
        stop, rm = docker.calls()[2:]
        assert stop[-1] == rm[-1] == "swarm-test-ovms"
        assert runner.status()["mode"] == "api"  # nothing runs in a container any more
        await runner.close()
        await runner.close()
        assert after_run(docker) == ["stop", "rm"]  # stopped once: close finds nothing to stop
        assert not server.requests_to(f"/v2/models/{MODEL}/ready")  # inner never loaded


async def test_container_load_cancelled_in_the_health_wait_is_stopped(tmp_path: Path) -> None:
    docker = FakeDocker(tmp_path)
    with FakeBackend() as server:
        runner = ContainedRunner(
            OVMSRunner(ovms_config(server.url)),
            container(server.url, ready_timeout_s=30),
            engine=docker.engine,
        )
        with trio.move_on_after(1.5) as scope:
            await runner.load()
        assert scope.cancelled_caught
        assert after_run(docker) == ["stop", "rm"]
        await runner.close()
        assert after_run(docker) == ["stop", "rm"]


async def test_container_load_cancelled_in_docker_run_is_removed(tmp_path: Path) -> None:
    """``docker run`` killed midway may have created the container: it goes too."""
    docker = FakeDocker(tmp_path, run_mode="hang")
    with FakeBackend() as server:
        runner = ContainedRunner(
            OVMSRunner(ovms_config(server.url)), container(server.url), engine=docker.engine
        )
        with trio.move_on_after(1.5) as scope:
            await runner.load()
        assert scope.cancelled_caught
        assert after_run(docker) == ["stop", "rm"]


async def test_container_docker_run_refused_stops_nothing(tmp_path: Path) -> None:
    """docker said no: nothing of ours runs, and a container of that name is not ours."""
    docker = FakeDocker(tmp_path, run_mode="fail")
    with FakeBackend() as server:
        runner = ContainedRunner(
            OVMSRunner(ovms_config(server.url)), container(server.url), engine=docker.engine
        )
        with pytest.raises(ModelLoadError, match=r"docker run failed: .*Conflict"):
            await runner.load()
        await runner.close()
        assert after_run(docker) == []


async def test_container_whose_inner_load_fails_is_stopped(tmp_path: Path) -> None:
    docker = FakeDocker(tmp_path)
    with FakeOVMS() as ovms:  # healthy, but without the model asked for
        transport = Watched()
        inner = OVMSRunner(ovms_config(ovms.url, "no-such-model"), transport=transport)
        runner = ContainedRunner(inner, container(ovms.url), engine=docker.engine)
        with pytest.raises(ModelNotFound):
            await runner.load()
        assert transport.closed
        assert after_run(docker) == ["stop", "rm"]


async def test_container_loaded_then_closed_through_batching(tmp_path: Path) -> None:
    """The chain the catalog builds: container around batching around the OVMS runner."""
    docker = FakeDocker(tmp_path)
    with FakeOVMS() as ovms:
        transport = Watched()
        inner = OVMSRunner(ovms_config(ovms.url), transport=transport)
        batching = BatchingRunner(inner, BatchConfig(max_batch=4))
        runner = ContainedRunner(batching, container(ovms.url), engine=docker.engine)
        await runner.load()
        await runner.load()  # idempotent: no second container
        assert after_run(docker) == []
        assert runner.status()["mode"] == "container"
        run = docker.calls()[1]
        assert run[run.index("--name") + 1] == "swarm-test-ovms"
        await runner.close()
        assert transport.closed
        assert after_run(docker) == ["stop", "rm"]
        await runner.close()
        assert after_run(docker) == ["stop", "rm"]


async def test_wrappers_close_the_runner_inside_after_a_failed_load(tmp_path: Path) -> None:
    with FakeOVMS() as ovms:
        ovms.plan(f"/v2/models/{MODEL}", Reply(500, {"error": "boom"}))
        transport = Watched()
        inner = OVMSRunner(ovms_config(ovms.url), transport=transport)
        runner = BatchingRunner(inner, BatchConfig(max_batch=4))
        with pytest.raises(ModelLoadError):
            await runner.load()
        await runner.close()
        assert transport.closed and inner.status()["loaded"] is False


# -- close on runners never loaded --------------------------------------------------------


def _openai(**fields: Any) -> Runner:
    table = Table({"name": "m", "base_url": "http://127.0.0.1:9", **fields}, "m")
    config = OpenAICompatConfig.from_table(table)
    table.done()
    return build_runner(config)


NEVER_LOADED: dict[str, Callable[[Path], Runner]] = {
    "ovms": lambda d: OVMSRunner(ovms_config("http://127.0.0.1:9")),
    "openai-generate": lambda d: _openai(),
    "openai-embed": lambda d: _openai(task="embeddings"),
    "tei": lambda d: _openai(api="tei"),
    "batching": lambda d: BatchingRunner(_openai(), BatchConfig(max_batch=2)),
    "container": lambda d: ContainedRunner(
        _openai(), container("http://127.0.0.1:9"), engine=FakeDocker(d).engine
    ),
    "torch-classify": lambda d: TorchClassifyRunner(d),
    "torch-embed": lambda d: TorchEmbedRunner(),
    "torch-generate": lambda d: TorchGenerateRunner(),
    "torch-stage": lambda d: TorchStageRunner(TorchStageConfig(LayerRange.parse("10-19"))),
}


@pytest.mark.parametrize("kind", sorted(NEVER_LOADED))
async def test_close_without_load_is_safe_and_idempotent(kind: str, tmp_path: Path) -> None:
    runner = NEVER_LOADED[kind](tmp_path)
    await runner.close()
    await runner.close()
    with trio.CancelScope() as scope:  # even from a cancelled scope
        scope.cancel()
        await runner.close()


# -- torch: a failed build leaves nothing of the model behind ------------------------------


def test_a_failed_torch_build_leaves_no_model_alive() -> None:
    """``build_on`` clears the failed build's frames: the half-built network is freed
    while the error is still held (on a GPU, its memory then goes back to the device)."""
    import torch

    resolved = resolve(TorchPlacement("cpu", "fp32"))
    made: list[weakref.ref[torch.nn.Module]] = []

    def build(where: Resolved) -> torch.nn.Module:
        network = torch.nn.Linear(256, 256).to(where.device)
        made.append(weakref.ref(network))
        raise RuntimeError("out of memory, say")

    with pytest.raises(ModelLoadError, match=r"tiny: cannot load on cpu: out of memory") as caught:
        build_on(resolved, build, "tiny")
    assert isinstance(caught.value.__cause__, RuntimeError)  # the cause is kept...
    assert made[0]() is None  # ...but not the network its frames held
