"""Which models a node can serve, declared the way a user writes them.

A model is declared by a table of settings: a ``[[models]]`` table in
config.toml, or the string given to ``swarm daemon --model``. Both become a
frozen ``ModelSpec`` at the top, validated at once (every field of the runner's
config, so a typo fails at start naming the field), and ``build_runner`` turns
a spec into an unloaded runner. The flag grammar::

    all-minilm-l6-v2         the embedded default: all-MiniLM-L6-v2 on OpenVINO CPU
    efficientnet-lite0       EfficientNet-Lite0 image classification on OpenVINO CPU
    smollm2-135m-instruct    SmolLM2-135M-Instruct text generation on OpenVINO GenAI
                             (also: smollm2)
    fake:NAME[:LATENCY_MS]   a FakeRunner serving NAME (for tests and benchmarks; the
                             table form also takes continues, stall_rate, stall_ms, seed)
    KIND:key=value,...       any kind below with its fields, e.g.
                             openai:name=smollm2,base_url=http://127.0.0.1:8080
                             openvino:name=nsfw,path=/models/nsfw.onnx,task=classify

Values in a flag are read as integers, numbers or true/false when they look
like one, else as text; ``a|b`` is a list. Secrets never go in flags (a command
line is visible to every user of the machine): name the environment variable
that holds a key with ``key_env=VAR``.

Kinds (the ``kind`` field of a table): see ``kinds()``. Every local kind also
takes ``batch_max`` and ``batch_wait_ms`` (dynamic batching, see
``runners.batching``). A table may name ``backend = "NAME"``: the fields of
config.toml's ``[backends.NAME]`` table (an endpoint: base URL, keys, limits,
breaker) are then its defaults. A remote kind (openai, ovms) may carry a
``container`` table: the node then starts that server in a container where a
container engine runs, and says it runs in API mode where none does (see
``runners.remote.contained``).

Errors: ``ModelSpecError`` (a ``ConfigError``, code BAD_REQUEST) for a spec
that does not parse or validate, with a message naming the field or listing
what is available.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.config import Table
from protocols.errors import ConfigError

from .base import Runner
from .batching import BatchConfig, BatchingRunner
from .fake import FakeConfig
from .openvino_embed import AUTO_MIN_COSINE, EmbedConfig, OpenVINOEmbedRunner
from .openvino_embed import MODEL_NAME as MINILM
from .ov_device import OVOptions

DEFAULT_MODEL = MINILM
EFFICIENTNET = "efficientnet-lite0"
SMOLLM2 = "smollm2-135m-instruct"
MAX_FAKE_LATENCY_MS = 3_600_000.0
_FAKE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?")


class ModelSpecError(ConfigError):
    """A model declaration that names nothing this node can serve, or a bad field."""


Build = Callable[[Path, Any], Runner]


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of runner: how to read its table, and how to build it."""

    read: Callable[[Table], Any]
    build: Build
    local: bool = True  # runs here (may batch), rather than forwarding to a server
    about: str = ""
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # before reading
    fixed_name: str | None = None  # the one model the kind serves, when it names it


def _read_embed(table: Table) -> EmbedConfig:
    table.text("name", MINILM, choices=(MINILM,))
    # The compile options every OpenVINO runner takes (device, hint, precision of
    # the weights, inference precision), checked the same way; both precisions
    # default to auto, measured at the first load (see runners.ov_choice).
    options = OVOptions.from_table(table, measured=True)
    if options.precision == "int4":
        message = f"{table.where}.precision: {MINILM} takes fp32, fp16 or int8 weights"
        raise ModelSpecError(f"{message} (int4 moves its embeddings too far)")
    if options.infer_requests:
        raise ModelSpecError(f"{table.where}.infer_requests: use concurrency for {MINILM}")
    return EmbedConfig(
        device=options.device,
        performance_hint=options.performance_hint,
        concurrency=table.integer("concurrency", 2, low=1, high=64),
        convert_timeout_s=table.number("convert_timeout_s", 300.0, low=1.0, high=86400.0),
        inference_precision=options.inference_precision,
        precision=options.precision,
        auto_min_cosine=table.number("auto_min_cosine", AUTO_MIN_COSINE, low=0.0, high=1.0),
    )


def _read_fake(table: Table) -> FakeConfig:
    name = table.text("name")
    if not _FAKE_NAME.fullmatch(name):
        raise ModelSpecError(
            f"fake model name {name!r} must be 1 to 128 letters, digits, '.', '_' or '-'"
        )
    return FakeConfig(
        name,
        latency_ms=table.number("latency_ms", 0.0, high=MAX_FAKE_LATENCY_MS),
        continues=table.flag("continues", True),
        stall_rate=table.number("stall_rate", 0.0, low=0.0, high=1.0),
        stall_ms=table.number("stall_ms", 0.0, high=MAX_FAKE_LATENCY_MS),
        seed=table.integer("seed", 0, low=0, high=2**63 - 1),
    )


def _kinds() -> dict[str, Kind]:
    # Imported here: each kind pulls its own libraries, and an unused kind costs nothing.
    from .openvino_genai import GenAIConfig, OpenVINOGenAIRunner
    from .ov_classify import OVClassifyConfig, OVClassifyRunner
    from .ov_generic import OVModelConfig, OVModelRunner
    from .remote.openai_compat import OpenAICompatConfig
    from .remote.openai_compat import build_runner as build_openai
    from .remote.ovms import OVMSConfig, build_ovms_runner
    from .torch_classify import TorchClassifyConfig, TorchClassifyRunner
    from .torch_embed import TorchEmbedConfig, TorchEmbedRunner
    from .torch_generate import TorchGenerateConfig, TorchGenerateRunner
    from .torch_stage import TorchStageConfig, TorchStageRunner

    return {
        "openvino-embed": Kind(
            _read_embed, lambda d, c: OpenVINOEmbedRunner(d, c), about="all-MiniLM-L6-v2"
        ),
        "openvino": Kind(
            OVModelConfig.from_table, lambda d, c: OVModelRunner(d, c), about="an IR or ONNX file"
        ),
        "openvino-classify": Kind(
            OVClassifyConfig.from_table,
            lambda d, c: OVClassifyRunner(d, c),
            about="EfficientNet-Lite0",
        ),
        "torch-classify": Kind(
            TorchClassifyConfig.from_table,
            lambda d, c: TorchClassifyRunner(d, c),
            about="EfficientNet-Lite0 on torch (CUDA when present)",
        ),
        "openvino-genai": Kind(
            GenAIConfig.from_table,
            lambda d, c: OpenVINOGenAIRunner(d, c),
            about="SmolLM2-135M-Instruct text generation, streamed",
            fixed_name=SMOLLM2,
        ),
        "torch-generate": Kind(
            TorchGenerateConfig.from_table,
            lambda d, c: TorchGenerateRunner(c),
            about="SmolLM2-135M-Instruct on torch (CUDA when present), streamed",
            fixed_name=SMOLLM2,
        ),
        "torch-stage": Kind(
            TorchStageConfig.from_table,
            lambda d, c: TorchStageRunner(c),
            about="a pipeline stage: SmolLM2-135M-Instruct layers A-B on torch (layers=A-B)",
        ),
        "torch-embed": Kind(
            TorchEmbedConfig.from_table,
            lambda d, c: TorchEmbedRunner(c),
            about="all-MiniLM-L6-v2 on torch (CUDA when present)",
            fixed_name=MINILM,
        ),
        "openai": Kind(
            OpenAICompatConfig.from_table,
            lambda d, c: build_openai(c),
            local=False,
            about="an OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI, OpenAI) or TEI",
        ),
        "ovms": Kind(
            OVMSConfig.from_table,
            lambda d, c: build_ovms_runner(c),
            local=False,
            about="OpenVINO Model Server",
            prepare=_ovms_names,
        ),
        "fake": Kind(
            _read_fake,
            lambda d, c: c.build(),
            about="a fake for tests and benchmarks",
        ),
    }


def _ovms_names(data: dict[str, Any]) -> dict[str, Any]:
    # In a model table ``name`` is the swarm's name for the model, as for every kind.
    if "served_name" not in data and "name" in data:
        return {**data, "served_name": data["name"]}
    return data


@functools.cache
def kinds() -> dict[str, Kind]:
    """Every kind of runner, by the name a model table gives in ``kind``."""
    return _kinds()


def available() -> str:
    return (
        f"{MINILM} (the default), {EFFICIENTNET}, {SMOLLM2}, fake:NAME[:LATENCY_MS], "
        "or KIND:key=value,... "
        f"with KIND one of {', '.join(sorted(kinds()))}"
    )


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A validated model declaration: its kind, its name, and the runner's config."""

    kind: str
    name: str
    config: Any = field(compare=False, repr=False)
    batching: BatchConfig | None = None
    container: Any = None  # a ContainerConfig: the node starts the server, when it can
    text: str = field(default="", compare=False)  # as written, for messages

    def __str__(self) -> str:
        return self.text or f"{self.kind}:name={self.name}"


def model_spec(data: Mapping[str, Any], where: str, *, text: str = "") -> ModelSpec:
    """Validate one model table (``kind`` defaults by name); raise ModelSpecError naming
    the field."""
    kind_name = Table(data, where).text("kind", _default_kind(data))
    kind = kinds().get(kind_name)
    if kind is None:
        raise ModelSpecError(f"{where}.kind: unknown kind {kind_name!r}; available: {available()}")
    container = None
    if not kind.local and isinstance(data.get("container"), Mapping):
        data, container = _container(data, where)
    table = Table(kind.prepare(dict(data)) if kind.prepare else data, where)
    table.text("kind", kind_name)
    try:
        if kind.fixed_name is not None:
            table.text("name", kind.fixed_name, choices=(kind.fixed_name,))
        batching = BatchConfig.from_table(table) if kind.local else None
        config = kind.read(table)
        table.done()
    except ModelSpecError:
        raise
    except ConfigError as exc:
        message = str(exc)
        raise ModelSpecError(message if where in message else f"{where}: {message}") from None
    name = data.get("name")
    if not isinstance(name, str) or not name:
        name = kind.fixed_name or getattr(config, "name", None) or MINILM
    return ModelSpec(kind_name, str(name), config, batching, container, text)


def _container(data: Mapping[str, Any], where: str) -> tuple[dict[str, Any], Any]:
    """Split off a ``container`` table; the server's URL defaults to the container's."""
    from .remote.container import ContainerConfig

    rest = {k: v for k, v in data.items() if k != "container"}
    table = Table(data["container"], f"{where}.container")
    try:
        config = ContainerConfig.from_table(table)
        table.done()
    except ConfigError as exc:
        raise ModelSpecError(str(exc)) from None
    rest.setdefault("base_url", config.base_url)
    return rest, config


def _default_kind(data: Mapping[str, Any]) -> str:
    name = str(data.get("name", "")).lower()
    if name == EFFICIENTNET:
        return "openvino-classify"
    if name in (SMOLLM2, "smollm2"):
        return "openvino-genai"
    return "openvino-embed" if name in ("", MINILM) else ""


def parse_model_spec(text: str) -> ModelSpec:
    """Parse one ``--model`` string; raise ModelSpecError naming what is wrong."""
    spec = text.strip()
    where = f"--model {spec!r}"
    if spec.lower() == MINILM:
        return model_spec({"kind": "openvino-embed"}, where, text=MINILM)
    if spec.lower() == EFFICIENTNET:
        return model_spec({"kind": "openvino-classify"}, where, text=EFFICIENTNET)
    if spec.lower() in (SMOLLM2, "smollm2"):
        return model_spec({"kind": "openvino-genai"}, where, text=SMOLLM2)
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if not sep or not rest or kind not in kinds():
        raise ModelSpecError(f"unknown model {text!r}; available: {available()}")
    if kind == "fake" and "=" not in rest:
        return _fake_shorthand(rest, where, spec)
    data: dict[str, Any] = {"kind": kind}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ModelSpecError(f"{where}: expected key=value, got {item!r}")
        data[key.strip()] = _value(value.strip())
    return model_spec(data, where, text=spec)


def _fake_shorthand(rest: str, where: str, spec: str) -> ModelSpec:
    name, _, latency = rest.partition(":")
    if not _FAKE_NAME.fullmatch(name):
        raise ModelSpecError(
            f"fake model name {name!r} must be 1 to 128 letters, digits, '.', '_' or '-'"
        )
    data: dict[str, Any] = {"kind": "fake", "name": name}
    if latency:
        try:
            latency_ms = float(latency)
        except ValueError:
            latency_ms = math.nan
        if not 0 <= latency_ms <= MAX_FAKE_LATENCY_MS:
            raise ModelSpecError(
                f"fake model latency {latency!r} must be milliseconds "
                f"from 0 to {MAX_FAKE_LATENCY_MS:g}"
            )
        data["latency_ms"] = latency_ms
    return model_spec(data, where, text=spec)


def _value(text: str) -> Any:
    if "|" in text:
        return [part for part in text.split("|") if part]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    return text


def specs_from_config(config: Mapping[str, Any], source: str) -> list[ModelSpec]:
    """The ``[[models]]`` of a parsed config.toml, with ``[backends.NAME]`` defaults."""
    backends = config.get("backends", {})
    if not isinstance(backends, Mapping):
        raise ModelSpecError(f"{source}: backends: expected tables [backends.NAME]")
    models = config.get("models", [])
    if not isinstance(models, list):
        raise ModelSpecError(f"{source}: models: expected [[models]] tables")
    specs = []
    for i, data in enumerate(models):
        where = f"{source}: models[{i}]"
        if not isinstance(data, Mapping):
            raise ModelSpecError(f"{where}: expected a table")
        data = dict(data)
        backend = data.pop("backend", None)
        if backend is not None:
            defaults = backends.get(backend) if isinstance(backend, str) else None
            if not isinstance(defaults, Mapping):
                raise ModelSpecError(
                    f"{where}.backend: no [backends.{backend}] table; have {sorted(backends)}"
                )
            data = {**defaults, **data}
        specs.append(model_spec(data, where))
    return specs


def build_runner(spec: ModelSpec | str, models_dir: Path) -> Runner:
    """A runner (not loaded yet) for ``spec``; ``models_dir`` holds converted models."""
    parsed = parse_model_spec(spec) if isinstance(spec, str) else spec
    runner = kinds()[parsed.kind].build(Path(models_dir), parsed.config)
    if parsed.batching is not None:
        runner = BatchingRunner(runner, parsed.batching)
    if parsed.container is not None:
        from .remote.contained import ContainedRunner

        runner = ContainedRunner(runner, parsed.container)
    return runner
