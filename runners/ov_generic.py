"""Any OpenVINO IR (.xml + .bin) or ONNX file, served as tensors in, tensors out.

The model declares its own interface: each input port becomes a ``TensorSpec``
(its first name, its element type as our dtype, its partial shape with None for
a dynamic dimension) and each output port an ``OutputSpec`` read the same way
(named ``output<i>`` when the port has no name). Nothing about the model's
meaning is assumed, so the config says which ``task`` it serves.

At ``precision = "fp32"`` the file is compiled as it is. Other precisions are
written once by a child process (``runners.ov_precision``) into the models dir,
keyed by a digest of the source files, so editing the model makes a new entry.

Config (``OVModelConfig.from_table``): ``name``, ``path``, ``task`` (required),
``max_batch`` (bound on a dynamic first dimension, default 64),
``convert_timeout_s``, and the compile options of ``ov_device.OVOptions``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import trio

from protocols import DTYPES, Param, Tensor, Value
from protocols.config import Table
from protocols.errors import ConfigError

from . import ov_cache, ov_precision
from .base import CONTENT_DIR, ModelInfo, Outputs, OutputSpec, Runner, TensorSpec, check_inputs
from .errors import BadInput, ModelLoadError, RunnerError
from .ov_device import OVOptions, compile_for, execution_devices, optimal_requests
from .ov_infer import InferQueue

RECIPE = "1"
CONTENT_MODEL = "model.xml"  # the model file a pulled content holds, unless ``path`` says
SUFFIXES = frozenset({".xml", ".onnx"})
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


@dataclass(frozen=True, slots=True)
class OVModelConfig:
    name: str
    path: Path
    task: str
    max_batch: int = 64
    convert_timeout_s: float = 600.0
    options: OVOptions = field(default_factory=OVOptions)
    # A content id (base58): the files were pulled from peers into the models dir's
    # ``content/<id>/``, and ``path`` names the model file there (see node.content).
    content: str | None = None

    def __post_init__(self) -> None:
        if self.path.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"path must end in {sorted(SUFFIXES)}")
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError("max_batch must be 1 to 4096")

    @classmethod
    def from_table(cls, table: Table) -> OVModelConfig:
        name = table.text("name")
        if not set(name.lower()) <= _NAME_CHARS:
            raise ConfigError(f"{table.where}.name: letters, digits, '.', '_' or '-' only")
        content = table.text("content", "") or None
        if content is not None and not (20 <= len(content) <= 64 and content.isalnum()):
            raise ConfigError(f"{table.where}.content: a base58 content id (Qm...)")
        # With a content id the model file's name inside the content; the one
        # .xml (else .onnx) the manifest lists when not given.
        text = table.text("path") if content is None else table.text("path", CONTENT_MODEL)
        path = Path(text).expanduser()
        if content is not None and (path.is_absolute() or ".." in path.parts):
            raise ConfigError(f"{table.where}.path: with content, a name inside the content")
        if path.suffix.lower() not in SUFFIXES:
            raise ConfigError(
                f"{table.where}.path: expected an OpenVINO .xml or an .onnx file, got {str(path)!r}"
            )
        config = cls(
            name=name,
            path=path,
            task=table.text("task"),
            max_batch=table.integer("max_batch", 64, low=1, high=4096),
            convert_timeout_s=table.number("convert_timeout_s", 600.0, low=1.0, high=86400.0),
            options=OVOptions.from_table(table),
            content=content,
        )
        table.done()
        return config


def dtype_of(element_type: Any) -> str | None:
    """Our wire dtype for an OpenVINO element type, or None when none matches (bf16, u4...)."""
    try:
        name = np.dtype(element_type.to_dtype()).name
    except Exception:
        return None
    return name if name in DTYPES else None


def port_spec(port: Any, index: int, kind: str) -> tuple[str, str, tuple[int | None, ...]]:
    """(name, dtype, shape with None for dynamic dims) of a port; ModelLoadError if unusable."""
    names = sorted(port.get_names())
    name = names[0] if names else f"{kind}{index}"
    dtype = dtype_of(port.get_element_type())
    if dtype is None:
        raise ModelLoadError(
            f"{kind} {name!r} has element type {port.get_element_type()}, which cannot travel"
        )
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        raise ModelLoadError(f"{kind} {name!r} has a dynamic rank; only dynamic dims are served")
    dims = tuple(d.get_length() if d.is_static else None for d in shape)
    return name, dtype, dims


class OVModelRunner(Runner):
    """Serves one IR/ONNX file: its inputs and outputs, as tensors."""

    def __init__(self, models_dir: Path, config: OVModelConfig) -> None:
        self.config = config
        self.models_dir = Path(models_dir)
        self.cache_root = Path(models_dir) / config.name / config.options.precision
        self.info = self._info(inputs=(), device=config.options.device)
        self._queue: InferQueue | None = None
        self._load_lock = trio.Lock()
        self._outputs: tuple[str, ...] = ()
        self._batched: tuple[str, ...] = ()  # inputs whose first dim is dynamic
        self.conversion_s: float | None = None

    def _info(
        self, inputs: tuple[TensorSpec, ...], device: str, outputs: tuple[OutputSpec, ...] = ()
    ) -> ModelInfo:
        c = self.config
        return ModelInfo(
            name=c.name,
            task=c.task,
            runner="openvino",
            device=device,
            precision=c.options.precision,
            max_batch=c.max_batch,
            inputs=inputs,
            outputs=outputs,
            extra={
                "performance_hint": c.options.performance_hint,
                "inference_precision": c.options.inference_precision,
                "source": c.path.suffix[1:],
            },
        )

    async def load(self) -> None:
        """Read (or convert once), compile, size the request pool. Idempotent."""
        async with self._load_lock:
            if self._queue is None:
                await self._load()

    @property
    def source(self) -> Path:
        """The model file: as configured, or inside the pulled content."""
        c = self.config
        return c.path if c.content is None else self.models_dir / CONTENT_DIR / c.content / c.path

    def files(self) -> tuple[Path, ...]:
        """The files this model is made of: what a node shares of it."""
        source = self.source
        if source.suffix.lower() == ".xml":
            return (source, source.with_suffix(".bin"))
        return (source,)

    async def _load(self) -> None:
        source = self.source
        if not source.is_file():
            raise ModelLoadError(f"{self.config.name}: no model file at {source}")
        if self.config.options.precision != "fp32":
            source = await self._converted()
        compiled, inputs, outputs = await trio.to_thread.run_sync(self._compile, source)
        jobs = optimal_requests(compiled, self.config.options.infer_requests)
        self._queue = InferQueue(compiled, jobs, self.config.name)
        self._outputs = tuple(o.name for o in outputs)
        self._batched = tuple(s.name for s in inputs if s.shape and s.shape[0] is None)
        device = execution_devices(compiled, self.config.options.device)
        self.info = self._info(inputs, device, outputs)
        self.concurrency = jobs

    def _compile(self, source: Path) -> tuple[Any, tuple[TensorSpec, ...], tuple[OutputSpec, ...]]:
        name = self.config.name
        core = ov.Core()
        try:
            model = core.read_model(str(source))
        except Exception as exc:
            raise ModelLoadError(f"{name}: cannot read {source}: {exc}") from exc
        try:
            ins = [port_spec(p, i, "input") for i, p in enumerate(model.inputs)]
            outs = [port_spec(p, i, "output") for i, p in enumerate(model.outputs)]
        except ModelLoadError as exc:
            raise ModelLoadError(f"{name}: {exc}") from exc
        specs = tuple(TensorSpec(n, frozenset({d}), s) for n, d, s in ins)
        compiled = compile_for(core, model, self.config.options, name)
        return compiled, specs, tuple(OutputSpec(n, d, s) for n, d, s in outs)

    async def _converted(self) -> Path:
        c = self.config
        parts = await trio.to_thread.run_sync(self._fingerprint_parts)
        path, self.conversion_s = await ov_cache.find_or_convert(
            self.cache_root,
            parts,
            lambda out: [
                "-m",
                "runners.ov_precision",
                str(self.source),
                str(out),
                c.options.precision,
            ],
            name=c.name,
            timeout_s=c.convert_timeout_s,
        )
        return path / ov_precision.XML

    def _fingerprint_parts(self) -> dict[str, str]:
        files = self.files()
        digest = hashlib.sha256()
        try:
            for f in files:
                with f.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
            nncf = importlib.metadata.version("nncf")
        except (OSError, importlib.metadata.PackageNotFoundError) as exc:
            raise ModelLoadError(f"{self.config.name}: cannot fingerprint: {exc}") from exc
        return {
            "source": digest.hexdigest(),
            "precision": self.config.options.precision,
            "openvino": importlib.metadata.version("openvino"),
            "nncf": nncf,
            "recipe": RECIPE,
        }

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self._feed(inputs, params)

    def _feed(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> dict[str, np.ndarray[Any, Any]]:
        if params:
            raise BadInput(f"{self.info.name}: takes no params, got {sorted(params)}")
        check_inputs(self.info, inputs)
        feed: dict[str, np.ndarray[Any, Any]] = {}
        for name, value in inputs.items():
            if not isinstance(value, Tensor):  # check_inputs saw to it; this narrows the type
                raise BadInput(f"{self.info.name}: input {name!r} must be a tensor")
            try:
                feed[name] = value.numpy()
            except ValueError as exc:
                raise BadInput(
                    f"{self.info.name}: input {name!r}: {value.nbytes} bytes do not fit "
                    f"shape {list(value.shape)}"
                ) from exc
        batches = {feed[n].shape[0] for n in self._batched if n in feed}
        if any(not 1 <= b <= self.config.max_batch for b in batches):
            raise BadInput(
                f"{self.info.name}: batch {sorted(batches)} outside 1 to {self.config.max_batch}"
            )
        return feed

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        feed = self._feed(inputs, params)
        queue = self._queue
        if queue is None:
            raise RunnerError(f"{self.info.name}: not loaded")
        results = await queue.run(feed)
        return {n: Tensor.from_numpy(a) for n, a in zip(self._outputs, results, strict=True)}

    async def close(self) -> None:
        self._queue = None
