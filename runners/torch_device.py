"""Where a torch runner runs: the ``device`` and ``dtype`` fields every torch config shares.

``device`` is "auto" (CUDA when ``torch.cuda.is_available()``, else the CPU),
"cpu", "cuda" or "cuda:N". ``dtype`` is "auto" (bf16 on a GPU that has it,
else fp16 on a GPU, fp32 on the CPU), "fp32", "fp16" or "bf16".

Half precision on the CPU is refused, not quietly run: most CPUs compute it
slowly or inexactly, and a user who asked for it on a GPU machine should hear
that no GPU was found rather than get a slow fp16 CPU model. "cpu" with fp16
is a ConfigError at start; "auto" that resolves to the CPU with fp16 is a
ModelLoadError at load, naming the reason.

Parsing needs no torch; ``resolve``, ``build_on`` and ``release`` import it
(call them from a worker thread). ``build_on`` makes a model on the resolved
device and, when that fails, leaves nothing of it there; ``release`` is for
``close``: it hands a closed model's GPU memory back, where torch would
otherwise keep it cached.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from protocols.config import Table
from protocols.errors import ConfigError

from .errors import ModelLoadError

T = TypeVar("T")
DTYPES = ("auto", "fp32", "fp16", "bf16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,2})?")


@dataclass(frozen=True, slots=True)
class TorchPlacement:
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        if self.device == "cpu" and self.dtype in ("fp16", "bf16"):
            raise ConfigError(f"dtype: {self.dtype} is refused on the CPU: use fp32 (or auto)")

    @classmethod
    def from_table(cls, table: Table, *, dtype: str = "auto") -> TorchPlacement:
        """Read ``device`` (any case) and ``dtype`` (default ``dtype``); a bad one is a
        ConfigError naming the field, as ``models[1].dtype: ...``."""
        device = table.text("device", "auto").lower()
        chosen = table.text("dtype", dtype, choices=DTYPES)
        try:
            return cls(device, chosen)
        except ConfigError as exc:
            raise ConfigError(f"{table.where}.{exc}") from None


@dataclass(frozen=True, slots=True)
class Resolved:
    """A concrete device and dtype: ``torch`` objects and the names shown to users."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype
    device_name: str  # "cpu", "cuda:0"
    precision: str  # "fp32", "fp16", "bf16"


def resolve(placement: TorchPlacement) -> Resolved:
    """Pick the device and dtype; raise ModelLoadError when they cannot be had. Blocks."""
    import torch

    cuda = torch.cuda.is_available()
    if placement.device == "auto":
        name = "cuda:0" if cuda else "cpu"
    elif placement.device == "cuda":
        name = "cuda:0"
    else:
        name = placement.device
    if name.startswith("cuda"):
        if not cuda:
            raise ModelLoadError(f"device {placement.device} asked for, but torch sees no CUDA GPU")
        index = int(name.partition(":")[2])
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {name} asked for, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    precision = placement.dtype
    if precision == "auto":
        if name == "cpu":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "cpu" and precision != "fp32":
        raise ModelLoadError(
            f"dtype {precision} is refused on the CPU (device {placement.device} found no GPU)"
        )
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return Resolved(torch.device(name), dtypes[precision], name, precision)


def release(resolved: Resolved) -> None:
    """Give a closed model's GPU memory back to the device. Blocks; nothing on the CPU.

    Call it once the runner has dropped its references to the model. torch keeps
    freed blocks cached for its own reuse, where no other model or process can
    have them; the collector first frees a model held only by reference cycles.
    Work still running in a thread keeps its own references, and its memory.
    """
    if resolved.device.type != "cuda":
        return
    import gc

    import torch

    gc.collect()
    with torch.cuda.device(resolved.device):
        torch.cuda.empty_cache()


def build_on(resolved: Resolved, build: Callable[[Resolved], T], what: str) -> T:
    """``build(resolved)``; if it fails, ModelLoadError, and nothing of the half-built
    model stays on the device. Blocks.

    The error's traceback holds the frames of ``build``, and their locals the
    model: they are cleared (the lines still show) before the memory is released.
    """
    try:
        return build(resolved)
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        release(resolved)
        raise ModelLoadError(f"{what}: cannot load on {resolved.device_name}: {exc}") from exc
