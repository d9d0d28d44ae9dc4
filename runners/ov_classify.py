"""EfficientNet-Lite0 image classification on OpenVINO.

Inputs, params and outputs are ``imagenet``'s (images or pixel values in,
top-k classes out). The IR is made once per weight precision by a child
process (``runners.convert_efficientnet``: torch never loads into the daemon)
and kept under ``<models_dir>/efficientnet-lite0/<precision>/`` (see
``ov_cache``). Every load checks the compiled model against the probe logits
the converter stored; a mismatch discards the entry and converts once more.

Precision: by default both the weights and the inference precision are
``auto``: the first load measures fp32/int8 weights at f32 and at every
precision the device offers (bf16 on AMX Xeons) on eight fixed gratings
(``precision_probe``), and keeps the fastest that gives the same top-1 class
and at least ``auto_min_top5`` of the same top-5 classes as fp32/f32 on every
one (see ``ov_choice``; the choice is cached in the model's dir). The gratings
were picked for clear answers (top-1 ahead by 1 to 3.8 logits): on noise the
model's top classes are near ties, and any arithmetic reorders them.

Config (``OVClassifyConfig.from_table``): ``name`` (default
``efficientnet-lite0``), ``convert_timeout_s``, ``auto_min_top5`` (1 to 5,
default 4), ``auto_min_cosine`` (a floor on the logits' cosine to fp32/f32
as well, default 0: not checked), and ``ov_device.OVOptions``: ``device``,
``performance_hint``, ``infer_requests``, ``precision`` (fp32, fp16, int8,
int4, auto), ``inference_precision`` (f32, bf16, f16, auto). Task:
``image-classification``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import trio

from protocols import Param, Value
from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_efficientnet as recipe
from . import imagenet, ir_cache, ov_cache, ov_choice
from .base import ModelInfo, Outputs, Runner
from .errors import ModelLoadError, RunnerError
from .ov_choice import AUTO, Candidate
from .ov_device import OVOptions, compile_for, execution_devices, optimal_requests
from .ov_infer import InferQueue

TASK = "image-classification"
# The probe's cosine to torch's logits: weight compression and bf16 arithmetic
# move logits (measured: bf16 0.9985, int8 0.994, int8 with bf16 0.990).
PROBE_MIN_COSINE = {"fp32": 0.995, "fp16": 0.995, "int8": 0.98, "int4": 0.98}
AUTO_MIN_TOP5 = 4
# The precision check's probe, also its timed batch: per image, one sinusoidal
# grating per colour channel as (cycles per image, angle in degrees).
PRECISION_GRATINGS = (
    ((18.0, 26), (11.1, 13), (2.5, 42)),
    ((14.4, 107), (21.8, 77), (9.0, 73)),
    ((4.8, 40), (17.6, 91), (18.3, 85)),
    ((23.2, 43), (4.5, 38), (10.1, 111)),
    ((19.4, 63), (21.9, 129), (16.4, 31)),
    ((12.8, 76), (16.0, 166), (11.3, 95)),
    ((4.1, 31), (23.8, 162), (3.3, 46)),
    ((6.2, 10), (13.6, 71), (4.1, 22)),
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")

log = logging.getLogger(__name__)


def precision_probe() -> np.ndarray[Any, np.dtype[np.float32]]:
    """PRECISION_GRATINGS as pixel values, float32 [8, 3, 224, 224] in [-0.99, 0.99]."""
    y, x = np.mgrid[0 : recipe.SIZE, 0 : recipe.SIZE] / recipe.SIZE
    images = [
        [
            np.sin(2 * np.pi * cycles * (np.cos(np.radians(a)) * x + np.sin(np.radians(a)) * y))
            for cycles, a in channels
        ]
        for channels in PRECISION_GRATINGS
    ]
    return np.ascontiguousarray(0.99 * np.asarray(images), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class OVClassifyConfig:
    name: str = recipe.MODEL_NAME
    convert_timeout_s: float = 600.0
    options: OVOptions = field(
        default_factory=lambda: OVOptions(precision=AUTO, inference_precision=AUTO)
    )
    auto_min_top5: int = AUTO_MIN_TOP5  # what an auto precision must keep
    auto_min_cosine: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.auto_min_top5 <= 5:
            raise ConfigError("auto_min_top5 must be from 1 to 5")
        if not 0.0 <= self.auto_min_cosine <= 1.0:
            raise ConfigError("auto_min_cosine must be from 0 to 1")

    @classmethod
    def from_table(cls, table: Table) -> OVClassifyConfig:
        name = table.text("name", recipe.MODEL_NAME)
        if not set(name.lower()) <= _NAME_CHARS:
            raise ConfigError(f"{table.where}.name: letters, digits, '.', '_' or '-' only")
        config = cls(
            name=name,
            convert_timeout_s=table.number("convert_timeout_s", 600.0, low=1.0, high=86400.0),
            options=OVOptions.from_table(table, measured=True),
            auto_min_top5=table.integer("auto_min_top5", AUTO_MIN_TOP5, low=1, high=5),
            auto_min_cosine=table.number("auto_min_cosine", 0.0, low=0.0, high=1.0),
        )
        table.done()
        return config


class _BadEntry(ov_cache.CorruptEntry):
    """A cache entry that does not read or does not match its probe."""


class OVClassifyRunner(Runner):
    def __init__(self, models_dir: Path, config: OVClassifyConfig | None = None) -> None:
        self.config = config or OVClassifyConfig()
        self.model_dir = Path(models_dir) / recipe.MODEL_NAME
        configured = self.config.options.precision
        # The entries of the weights in use (fp32's until an auto precision is chosen).
        self.cache_root = self.root("fp32" if configured == AUTO else configured)
        self.info = self._info(self.config.options.device, None)
        self._queue: InferQueue | None = None
        self._load_lock = trio.Lock()
        self.conversion_s: float | None = None  # seconds the last load spent converting, if any
        self.choice: ov_choice.Choice | None = None  # the precision in use, once loaded
        self._entries: dict[str, Path] = {}  # weights -> the cache entry opened for them

    def files(self) -> tuple[Path, ...]:
        """The converted IR in use (its .xml and .bin): what the node shares of it, so a
        peer can pull it and serve it as an ``openvino`` model without converting."""
        entry = self._entries.get(self.choice.chosen.weights) if self.choice else None
        return () if entry is None else (entry / recipe.XML, entry / recipe.BIN)

    def root(self, weights: str) -> Path:
        """One root per weight precision: loading prunes every other entry of a root."""
        return self.model_dir / weights

    def _info(self, device: str, chosen: Candidate | None) -> ModelInfo:
        o = self.config.options
        inference = o.inference_precision if chosen is None else chosen.inference
        return ModelInfo(
            name=self.config.name,
            task=TASK,
            runner="openvino",
            device=device,
            precision=o.precision if chosen is None else chosen.weights,
            max_batch=imagenet.MAX_BATCH,
            inputs=imagenet.INPUTS,
            outputs=imagenet.OUTPUTS,
            extra={
                "classes": imagenet.CLASSES,
                "performance_hint": o.performance_hint,
                "inference_precision": inference,
            },
        )

    async def load(self) -> None:
        async with self._load_lock:
            if self._queue is not None:
                return
            o = self.config.options
            facts = await trio.to_thread.run_sync(ov_choice.device_facts, o.device)
            plan = ov_choice.plan(o.precision, o.inference_precision, facts, o.device)
            parts = {"model": recipe.MODEL_NAME, "hint": o.performance_hint}
            for weights in sorted({c.weights for c in plan.candidates}):
                ir = await trio.to_thread.run_sync(self._fingerprint_parts, weights)
                parts[f"ir-{weights}"] = ir_cache.fingerprint(ir)
            self.conversion_s = None
            compiled, choice = await ov_choice.open_chosen(
                plan,
                open_candidate=self._open_candidate,
                compiled_of=lambda c: c,
                feeds=lambda _: ({recipe.INPUT: precision_probe()},) * 2,
                check=ov_choice.ClassificationCheck(
                    self.config.auto_min_top5, self.config.auto_min_cosine
                ),
                directory=self.model_dir,
                parts=parts,
                name=self.config.name,
            )
            jobs = optimal_requests(compiled, o.infer_requests)
            self._queue = InferQueue(compiled, jobs, self.config.name)
            self.concurrency = jobs
            self.choice = choice
            self.cache_root = self.root(choice.chosen.weights)
            self.info = self._info(execution_devices(compiled, o.device), choice.chosen)

    def status(self) -> dict[str, Any] | None:
        if self.choice is None:
            return None
        return {"precision": self.choice.describe(), "summary": self.choice.summary()}

    async def _open_candidate(self, candidate: Candidate) -> Any:
        weights = candidate.weights
        parts = await trio.to_thread.run_sync(self._fingerprint_parts, weights)
        compiled, took = await ov_cache.open_or_convert(
            self.root(weights),
            parts,
            lambda out: ["-m", "runners.convert_efficientnet", str(out), weights],
            lambda path: trio.to_thread.run_sync(self._open, path, candidate),
            name=self.config.name,
            timeout_s=self.config.convert_timeout_s,
        )
        if took is not None:
            self.conversion_s = (self.conversion_s or 0.0) + took
        return compiled

    def _open(self, path: Path, candidate: Candidate) -> Any:
        """Compile the entry for ``candidate`` and prove it on its probe. Blocks."""
        self._entries[candidate.weights] = path
        core = ov.Core()
        try:
            model = core.read_model(str(path / recipe.XML), str(path / recipe.BIN))
            expected = np.asarray(
                json.loads((path / recipe.PROBE).read_text())["logits"], dtype=np.float32
            )
        except Exception as exc:
            raise _BadEntry(f"{path.name} does not load: {exc}") from exc
        options = replace(
            self.config.options,
            precision=candidate.weights,
            inference_precision=candidate.inference,
        )
        compiled = compile_for(core, model, options, self.config.name)
        try:
            request = compiled.create_infer_request()
            got = np.array(request.infer({recipe.INPUT: recipe.probe_input()})[0], copy=True)
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
        floor = PROBE_MIN_COSINE[candidate.weights]
        if not cosine >= floor:
            raise _BadEntry(f"{path.name}: probe cosine {cosine:.5f} < {floor}")
        return compiled

    def _fingerprint_parts(self, weights: str) -> dict[str, str]:
        try:
            parts = {p: importlib.metadata.version(p) for p in recipe.PACKAGES}
            parts["openvino"] = importlib.metadata.version("openvino")
            if weights in ("int8", "int4"):
                parts["nncf"] = importlib.metadata.version("nncf")
        except importlib.metadata.PackageNotFoundError as exc:
            raise ModelLoadError(f"{self.config.name}: {exc} is not installed") from exc
        parts.update(model=recipe.MODEL_NAME, precision=weights, recipe=recipe.RECIPE)
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
