"""Container mode: start an OVMS or vLLM server in a local container, then forward to it.

Where a container engine runs, a node can start its backend itself
(``openvino/model_server`` or ``vllm/vllm-openai``) instead of being pointed at
one. This module only builds and runs ``docker`` commands; the runner that
forwards to the started server is the same as in API mode.

- ``ContainerConfig`` is frozen and validated; ``run_argv`` turns it into the
  ``docker run`` argv as a pure function, so what would run can be tested and
  shown without an engine. Ports publish on 127.0.0.1 unless told otherwise;
  the model directory is mounted read-only; the container is ``--rm``. No
  secret is ever on the command line (``ps`` shows it to every user): a value
  given inline whose name looks like a secret is refused; secrets pass by name
  (``-e NAME``: docker copies it from its own environment) or by ``env_file``.
- ``detect_engine`` runs ``docker info`` (bounded) and says why there is no
  engine, so the node can print "no container engine (docker info: ...):
  running in API mode" at start.
- ``start``, ``stop`` and ``wait_ready`` run docker and poll the server's
  health route with every wait bounded, on trio. ``start`` leaves no
  container behind when it fails; ``stop`` stops and removes, shielded.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from protocols.config import Table
from protocols.errors import ConfigError

from ..errors import ModelLoadError

log = logging.getLogger(__name__)
KINDS = ("ovms", "vllm")
DEFAULT_IMAGES = {"ovms": "openvino/model_server:latest", "vllm": "vllm/vllm-openai:latest"}
CONTAINER_PORT = {"ovms": 8000, "vllm": 8000}
HEALTH_PATH = {"ovms": "/v2/health/ready", "vllm": "/health"}
MODEL_MOUNT = "/models"
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_SECRET_ARGS = ("--api-key", "--hf-token", "--token")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./:-]{0,255}")


@dataclass(frozen=True, slots=True)
class ContainerConfig:
    """One backend container. ``env`` holds plain settings; secrets go by ``env_pass``."""

    kind: str  # "ovms" | "vllm"
    name: str  # the container's name
    model_name: str  # the name the server serves (vLLM: a hub id when no model_path)
    host_port: int
    image: str = ""  # default: DEFAULT_IMAGES[kind]
    model_path: str | None = None  # a host directory, mounted read-only
    bind_host: str = "127.0.0.1"
    gpu: bool = False
    gpu_devices: str = "all"  # for --gpus (vLLM): "all" or "0,1"
    env: tuple[tuple[str, str], ...] = ()
    env_pass: tuple[str, ...] = ()  # names copied from docker's environment
    env_file: str | None = None
    extra_args: tuple[str, ...] = ()  # appended to the server's own arguments
    ready_timeout_s: float = 300.0  # for the health route to answer 200 after start

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if not _CONTAINER_NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} is not a container name")
        if not _MODEL_NAME.fullmatch(self.model_name):
            raise ConfigError(f"model_name: {self.model_name!r} is not a model name")
        if not 1 <= self.host_port <= 65535:
            raise ConfigError("host_port: expected 1 to 65535")
        if self.kind == "ovms" and not self.model_path:
            raise ConfigError("model_path: OVMS needs a model directory")
        if self.model_path is not None and (":" in self.model_path or not self.model_path):
            raise ConfigError("model_path: a host directory without ':'")
        if not re.fullmatch(r"all|[0-9]+(,[0-9]+)*", self.gpu_devices):
            raise ConfigError("gpu_devices: 'all' or device numbers such as '0,1'")
        if not 0 < self.ready_timeout_s <= 86400:
            raise ConfigError("ready_timeout_s: expected more than 0 and at most 86400")
        for key, _ in self.env:
            if not _ENV_NAME.fullmatch(key):
                raise ConfigError(f"env: {key!r} is not a variable name")
            if _SECRET_NAME.search(key):
                raise ConfigError(f"env: {key} looks like a secret; pass it by name in env_pass")
        for key in self.env_pass:
            if not _ENV_NAME.fullmatch(key):
                raise ConfigError(f"env_pass: {key!r} is not a variable name")
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in _SECRET_ARGS:
                raise ConfigError(
                    f"extra_args: {arg.split('=', 1)[0]} puts a secret on the "
                    "command line; pass it by name in env_pass"
                )

    @property
    def image_ref(self) -> str:
        return self.image or DEFAULT_IMAGES[self.kind]

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.bind_host in ("0.0.0.0", "") else self.bind_host
        return f"http://{host}:{self.host_port}"

    @classmethod
    def from_table(cls, table: Table) -> ContainerConfig:
        """Fields: kind, name, model_name, host_port (required); image, model_path,
        bind_host, gpu, gpu_devices, env (a table of strings), env_pass, env_file,
        extra_args, ready_timeout_s. The caller calls ``table.done()``."""
        env_table = table.table("env")
        env = (
            ()
            if env_table is None
            else tuple((key, env_table.text(key)) for key in sorted(env_table.data))
        )
        try:
            return cls(
                kind=table.text("kind", choices=KINDS),
                name=table.text("name"),
                model_name=table.text("model_name"),
                host_port=table.integer("host_port", low=1, high=65535),
                image=table.text("image", ""),
                model_path=table.text("model_path", None),
                bind_host=table.text("bind_host", "127.0.0.1"),
                gpu=table.flag("gpu", False),
                gpu_devices=table.text("gpu_devices", "all"),
                env=env,
                env_pass=table.texts("env_pass", ()),
                env_file=table.text("env_file", None),
                extra_args=table.texts("extra_args", ()),
                ready_timeout_s=table.number("ready_timeout_s", 300.0, low=0.001, high=86400),
            )
        except ConfigError as exc:
            if table.where in str(exc):  # a field error from Table: already says where
                raise
            raise ConfigError(f"{table.where}.{exc}") from None


def run_argv(config: ContainerConfig, engine: str = "docker") -> list[str]:
    """The ``docker run`` command line that starts ``config``'s server, detached."""
    c = config
    port = CONTAINER_PORT[c.kind]
    argv = [engine, "run", "--rm", "--detach", "--name", c.name]
    argv += ["--publish", f"{c.bind_host}:{c.host_port}:{port}"]
    mount = f"{MODEL_MOUNT}/{c.model_name}" if c.model_path else None
    if c.model_path:
        argv += ["--volume", f"{c.model_path}:{mount}:ro"]
    if c.gpu:
        if c.kind == "vllm":
            devices = "all" if c.gpu_devices == "all" else f'"device={c.gpu_devices}"'
            argv += ["--gpus", devices, "--ipc", "host"]
        else:  # OVMS on Intel GPUs: the render nodes
            argv += ["--device", "/dev/dri"]
    for key, value in c.env:
        argv += ["--env", f"{key}={value}"]
    for key in c.env_pass:
        argv += ["--env", key]  # no value: docker copies it from its environment
    if c.env_file:
        argv += ["--env-file", c.env_file]
    argv.append(c.image_ref)
    if c.kind == "ovms":
        argv += ["--model_name", c.model_name, "--model_path", str(mount)]
        argv += ["--rest_port", str(port), "--rest_bind_address", "0.0.0.0"]
        if c.gpu:
            argv += ["--target_device", "GPU"]
    else:
        argv += ["--model", mount or c.model_name, "--served-model-name", c.model_name]
        argv += ["--host", "0.0.0.0", "--port", str(port)]
    argv += list(c.extra_args)
    return argv


def stop_argv(name: str, grace_s: int = 10, engine: str = "docker") -> list[str]:
    return [engine, "stop", "--time", str(grace_s), name]


@dataclass(frozen=True, slots=True)
class EngineStatus:
    available: bool
    reason: str  # the engine's version, or why there is none

    def describe(self) -> str:
        if self.available:
            return f"container engine: {self.reason}"
        return f"no container engine ({self.reason}): running in API mode"


Run = Callable[..., "subprocess.CompletedProcess[str]"]


def detect_engine(
    engine: str = "docker", *, timeout_s: float = 10.0, run: Run = subprocess.run
) -> EngineStatus:
    """Whether ``engine info`` answers; blocking (call it from a thread or at start)."""
    if shutil.which(engine) is None:
        return EngineStatus(False, f"{engine}: not found on PATH")
    argv = [engine, "info", "--format", "{{.ServerVersion}}"]
    try:
        done = run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return EngineStatus(False, f"{engine} info: no answer in {timeout_s:g} s")
    except OSError as exc:
        return EngineStatus(False, f"{engine} info: {exc}")
    text = (done.stderr or done.stdout or "").strip()
    first = text.splitlines()[0][:300] if text else f"exit status {done.returncode}"
    version = (done.stdout or "").strip()
    if done.returncode != 0 or not version:
        return EngineStatus(False, f"{engine} info: {first}")
    return EngineStatus(True, f"{engine} {version}")


def rm_argv(name: str, engine: str = "docker") -> list[str]:
    return [engine, "rm", "--force", name]


async def start(config: ContainerConfig, engine: str = "docker", timeout_s: float = 600) -> str:
    """Run the container (pulling the image may take minutes); its id.

    Either a container runs when this returns, or none of ours is left: a
    ``docker run`` cut short (the timeout, or cancellation) may have created
    the container already, so it is stopped and removed before the error
    leaves. A ``docker run`` that fails on its own started nothing, and a
    container already holding the name is not ours: nothing is removed then.
    """
    try:
        with trio.move_on_after(timeout_s) as scope:
            done = await trio.run_process(
                run_argv(config, engine), capture_stdout=True, capture_stderr=True, check=False
            )
    except BaseException:
        await stop(config.name, engine)
        raise
    if scope.cancelled_caught:
        await stop(config.name, engine)
        raise ModelLoadError(f"{config.name}: docker run took over {timeout_s:g} s")
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[:400]
        raise ModelLoadError(f"{config.name}: docker run failed: {err}")
    return str(done.stdout.decode().strip())


async def stop(name: str, engine: str = "docker", grace_s: int = 10) -> None:
    """Stop the container, then remove it; absent is fine. Shielded from cancellation
    (it is what cleans up after one) and bounded.

    ``--rm`` removes a container that ran once it stops, but not one that was
    only created (a ``docker run`` cut short): ``rm --force`` takes that too.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(grace_s + 30):
        for argv in (stop_argv(name, grace_s, engine), rm_argv(name, engine)):
            try:
                await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
            except OSError as exc:  # the engine itself is gone: nothing more to do here
                log.warning("%s: %s: %s", name, describe_argv(argv), exc)
                return


async def wait_ready(
    config: ContainerConfig,
    timeout_s: float = 300,
    interval_s: float = 1.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Poll the server's health route until it answers 200; ModelLoadError after the timeout."""
    url = config.base_url + HEALTH_PATH[config.kind]
    last: Any = "no answer"
    async with httpx.AsyncClient(timeout=5.0, trust_env=False, transport=transport) as client:
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    response = await client.get(url)
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                await trio.sleep(interval_s)
    raise ModelLoadError(f"{config.name}: {url} not ready after {timeout_s:g} s ({last})")


def describe_argv(argv: Sequence[str]) -> str:
    """The command as one line for logs (it holds no secrets by construction)."""
    return " ".join(argv)
