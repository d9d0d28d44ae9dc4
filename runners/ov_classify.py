"""EfficientNet-Lite0 image classification on OpenVINO.

Inputs, params and outputs are ``imagenet``'s (images or pixel values in,
top-k classes out). The IR is made once per precision by a child process
(``runners.convert_efficientnet``: torch never loads into the daemon) and kept
under ``<models_dir>/efficientnet-lite0/<precision>/`` (see ``ov_cache``).
Every load checks the compiled model against the probe logits the converter
stored; a mismatch discards the entry and converts once more.

Config (``OVClassifyConfig.from_table``): ``name`` (default
``efficientnet-lite0``), ``convert_timeout_s``, and ``ov_device.OVOptions``:
``device``, ``performance_hint``, ``infer_requests``, ``precision``
(fp32, fp16, int8, int4), ``inference_precision``. Task: ``image-classification``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import trio

from protocols import Param, Value
from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_efficientnet as recipe
from . import imagenet, ov_cache
from .base import ModelInfo, Outputs, Runner
from .errors import ModelLoadError, RunnerError
from .ov_device import OVOptions, compile_for, execution_devices, optimal_requests
from .ov_infer import InferQueue

TASK = "image-classification"
# The probe's cosine to torch's logits: weight compression and bf16 arithmetic move logits.
PROBE_MIN_COSINE = {"fp32": 0.995, "fp16": 0.995, "int8": 0.98, "int4": 0.98}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OVClassifyConfig:
    name: str = recipe.MODEL_NAME
    convert_timeout_s: float = 600.0
    options: OVOptions = field(default_factory=OVOptions)

    @classmethod
    def from_table(cls, table: Table) -> OVClassifyConfig:
        name = table.text("name", recipe.MODEL_NAME)
        if not set(name.lower()) <= _NAME_CHARS:
            raise ConfigError(f"{table.where}.name: letters, digits, '.', '_' or '-' only")
        config = cls(
            name=name,
            convert_timeout_s=table.number("convert_timeout_s", 600.0, low=1.0, high=86400.0),
            options=OVOptions.from_table(table),
        )
        table.done()
        return config


class _BadEntry(Exception):
    """A cache entry that does not read or does not match its probe."""


class OVClassifyRunner(Runner):
    def __init__(self, models_dir: Path, config: OVClassifyConfig | None = None) -> None:
        self.config = config or OVClassifyConfig()
        self.cache_root = Path(models_dir) / recipe.MODEL_NAME / self.config.options.precision
        self.info = self._info(self.config.options.device)
        self._queue: InferQueue | None = None
        self._load_lock = trio.Lock()
        self.conversion_s: float | None = None  # seconds the last conversion took, if any

    def _info(self, device: str) -> ModelInfo:
        o = self.config.options
        return ModelInfo(
            name=self.config.name,
            task=TASK,
            runner="openvino",
            device=device,
            precision=o.precision,
            max_batch=imagenet.MAX_BATCH,
            inputs=imagenet.INPUTS,
            outputs=imagenet.OUTPUTS,
            extra={
                "classes": imagenet.CLASSES,
                "performance_hint": o.performance_hint,
                "inference_precision": o.inference_precision,
            },
        )

    async def load(self) -> None:
        async with self._load_lock:
            if self._queue is not None:
                return
            parts = await trio.to_thread.run_sync(self._fingerprint_parts)
            compiled = None
            for attempt in range(2):
                path, took = await ov_cache.find_or_convert(
                    self.cache_root,
                    parts,
                    lambda out: [
                        "-m",
                        "runners.convert_efficientnet",
                        str(out),
                        self.config.options.precision,
                    ],
                    name=self.config.name,
                    timeout_s=self.config.convert_timeout_s,
                )
                if took is not None:
                    self.conversion_s = took
                try:
                    compiled = await trio.to_thread.run_sync(self._open, path)
                    break
                except _BadEntry as exc:
                    if attempt or took is not None:
                        raise ModelLoadError(f"{self.config.name}: {exc}") from exc
                    log.warning("discarding damaged cache entry %s: %s", path, exc)
                    await ov_cache.discard(path, self.config.name)
            jobs = optimal_requests(compiled, self.config.options.infer_requests)
            self._queue = InferQueue(compiled, jobs, self.config.name)
            self.concurrency = jobs
            self.info = self._info(execution_devices(compiled, self.config.options.device))

    def _open(self, path: Path) -> Any:
        """Compile the entry and prove it on its probe. Blocks."""
        core = ov.Core()
        try:
            model = core.read_model(str(path / recipe.XML), str(path / recipe.BIN))
            expected = np.asarray(
                json.loads((path / recipe.PROBE).read_text())["logits"], dtype=np.float32
            )
        except Exception as exc:
            raise _BadEntry(f"{path.name} does not load: {exc}") from exc
        compiled = compile_for(core, model, self.config.options, self.config.name)
        try:
            got = compiled(recipe.probe_input())[0]
        except Exception as exc:
            raise _BadEntry(f"{path.name} fails its probe: {exc}") from exc
        if got.shape != expected.shape:
            raise _BadEntry(f"{path.name}: probe shape {got.shape}, expected {expected.shape}")
        cosine = float(
            np.min(
                np.sum(got * expected, axis=1)
                / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)
            )
        )
        floor = PROBE_MIN_COSINE[self.config.options.precision]
        if not cosine >= floor:
            raise _BadEntry(f"{path.name}: probe cosine {cosine:.5f} < {floor}")
        return compiled

    def _fingerprint_parts(self) -> dict[str, str]:
        try:
            parts = {p: importlib.metadata.version(p) for p in recipe.PACKAGES}
            parts["openvino"] = importlib.metadata.version("openvino")
            if self.config.options.precision in ("int8", "int4"):
                parts["nncf"] = importlib.metadata.version("nncf")
        except importlib.metadata.PackageNotFoundError as exc:
            raise ModelLoadError(f"{self.config.name}: {exc} is not installed") from exc
        parts.update(
            model=recipe.MODEL_NAME, precision=self.config.options.precision, recipe=recipe.RECIPE
        )
        return parts

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        imagenet.parse(self.info, inputs)
        imagenet.parse_params(self.info.name, params)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        batch = imagenet.parse(self.info, inputs)
        k, want_logits = imagenet.parse_params(self.info.name, params)
        queue = self._queue
        if queue is None:
            raise RunnerError(f"{self.info.name}: not loaded")
        (logits,) = await queue.run(lambda: {recipe.INPUT: imagenet.pixels(batch)})
        return imagenet.answer(logits, k, want_logits)

    async def close(self) -> None:
        self._queue = None
