"""Container mode: the ``docker run`` command lines, and engine detection on this machine.

No container engine runs here (the docker client is installed, its daemon is
not), so starting a container is not tested; what would run is, exactly, and
detection is tested against the real ``docker info`` failing.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import httpx
import pytest

from protocols.config import Table
from protocols.errors import ConfigError
from runners.errors import ModelLoadError
from runners.remote import container
from runners.remote.container import ContainerConfig, detect_engine, run_argv


def ovms(**fields: Any) -> ContainerConfig:
    base: dict[str, Any] = {
        "kind": "ovms",
        "name": "swarm-ovms",
        "model_name": "resnet",
        "host_port": 9001,
        "model_path": "/srv/models/resnet",
    }
    return ContainerConfig(**{**base, **fields})


def vllm(**fields: Any) -> ContainerConfig:
    base: dict[str, Any] = {
        "kind": "vllm",
        "name": "swarm-vllm",
        "model_name": "Qwen/Qwen2.5-0.5B-Instruct",
        "host_port": 8100,
    }
    return ContainerConfig(**{**base, **fields})


def after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_ovms_argv() -> None:
    argv = run_argv(ovms(image="openvino/model_server:2025.3", env=(("OMP_NUM_THREADS", "4"),)))
    image_at = argv.index("openvino/model_server:2025.3")
    docker, server = argv[:image_at], argv[image_at + 1 :]
    assert docker[:4] == ["docker", "run", "--rm", "--detach"]
    assert after(docker, "--name") == ["swarm-ovms"]
    assert after(docker, "--publish") == ["127.0.0.1:9001:8000"]  # loopback by default
    assert after(docker, "--volume") == ["/srv/models/resnet:/models/resnet:ro"]
    assert after(docker, "--env") == ["OMP_NUM_THREADS=4"]
    assert "--gpus" not in docker and "--device" not in docker
    assert after(server, "--model_name") == ["resnet"]
    assert after(server, "--model_path") == ["/models/resnet"]
    assert after(server, "--rest_port") == ["8000"]
    assert "--target_device" not in server


def test_gpu_flags() -> None:
    argv = run_argv(ovms(gpu=True))
    assert after(argv, "--device") == ["/dev/dri"] and after(argv, "--target_device") == ["GPU"]
    argv = run_argv(vllm(gpu=True))
    assert after(argv, "--gpus") == ["all"] and after(argv, "--ipc") == ["host"]
    argv = run_argv(vllm(gpu=True, gpu_devices="0,1"))
    assert after(argv, "--gpus") == ['"device=0,1"']


def test_vllm_argv_passes_secrets_by_name_only() -> None:
    argv = run_argv(
        vllm(
            model_path="/srv/qwen",
            env_pass=("VLLM_API_KEY", "HF_TOKEN"),
            env_file="/etc/swarm/vllm.env",
            bind_host="10.0.0.5",
            extra_args=("--max-model-len", "4096"),
        )
    )
    assert after(argv, "--publish") == ["10.0.0.5:8100:8000"]
    assert after(argv, "--volume") == ["/srv/qwen:/models/Qwen/Qwen2.5-0.5B-Instruct:ro"]
    assert after(argv, "--env") == ["VLLM_API_KEY", "HF_TOKEN"]  # names: docker copies values
    assert after(argv, "--env-file") == ["/etc/swarm/vllm.env"]
    assert after(argv, "--model") == ["/models/Qwen/Qwen2.5-0.5B-Instruct"]
    assert after(argv, "--served-model-name") == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert argv[-2:] == ["--max-model-len", "4096"]
    assert argv[argv.index("vllm/vllm-openai:latest") - 1] != "--env"
    assert vllm().base_url == "http://127.0.0.1:8100"


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"env": (("HF_TOKEN", "hf_abc"),)}, "looks like a secret"),
        ({"env": (("OPENAI_API_KEY", "sk-1"),)}, "looks like a secret"),
        ({"extra_args": ("--api-key", "sk-1")}, "secret on the command line"),
        ({"extra_args": ("--api-key=sk-1",)}, "secret on the command line"),
        ({"kind": "triton"}, "kind"),
        ({"name": "bad name"}, "name"),
        ({"host_port": 0}, "host_port"),
        ({"model_path": "/a:/etc"}, "model_path"),
        ({"gpu_devices": "0;rm"}, "gpu_devices"),
        ({"env_pass": ("A-B",)}, "env_pass"),
    ],
)
def test_bad_configs_are_refused(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        vllm(**fields)
    with pytest.raises(ConfigError, match="model_path"):
        ovms(model_path=None)


def test_from_table() -> None:
    table = Table(
        {
            "kind": "ovms",
            "name": "c1",
            "model_name": "m",
            "host_port": 9000,
            "model_path": "/m",
            "env": {"OMP_NUM_THREADS": "2"},
            "gpu": True,
        },
        "containers[0]",
    )
    config = ContainerConfig.from_table(table)
    table.done()
    assert config.env == (("OMP_NUM_THREADS", "2"),) and config.gpu
    with pytest.raises(ConfigError, match=r"containers\[1\]\.host_port"):
        ContainerConfig.from_table(
            Table(
                {"kind": "ovms", "name": "c", "model_name": "m", "host_port": "x"}, "containers[1]"
            )
        )


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client on this machine")
def test_detect_engine_reports_why_there_is_none() -> None:
    """This machine has the docker client but no engine: ``docker info`` fails, and says why."""
    status = detect_engine(timeout_s=20)
    if status.available:
        pytest.skip(f"a container engine runs here ({status.reason}); absence cannot be shown")
    assert status.reason.startswith("docker info: ")
    assert "daemon" in status.reason.lower() or "connect" in status.reason.lower()
    assert status.describe().startswith("no container engine (docker info: ")
    assert status.describe().endswith("): running in API mode")


def test_detect_engine_absent_binary_and_timeout() -> None:
    status = detect_engine("no-such-engine-here")
    assert not status.available and status.reason == "no-such-engine-here: not found on PATH"

    def hangs(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    def answers(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, stdout="27.3.1\n", stderr="")

    # ``sh`` exists everywhere; only the run function is swapped.
    assert detect_engine("sh", run=hangs).reason == "sh info: no answer in 10 s"
    ok = detect_engine("sh", run=answers)
    assert ok.available and ok.reason == "sh 27.3.1"


async def test_wait_ready_is_bounded() -> None:
    def unready(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/health/ready"
        return httpx.Response(503)

    with pytest.raises(ModelLoadError, match=r"not ready after 0.3 s \(HTTP 503\)"):
        await container.wait_ready(
            ovms(), timeout_s=0.3, interval_s=0.05, transport=httpx.MockTransport(unready)
        )
    await container.wait_ready(
        vllm(), timeout_s=1, transport=httpx.MockTransport(lambda r: httpx.Response(200))
    )


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client on this machine")
async def test_start_without_engine_fails_clearly() -> None:
    if detect_engine(timeout_s=20).available:
        pytest.skip("a container engine runs here; this test needs its absence")
    with pytest.raises(ModelLoadError, match="docker run failed"):
        await container.start(ovms(name="swarm-test-never-started"), timeout_s=30)
