"""Where and how an OpenVINO model is compiled: device, performance hint, precisions.

Every OpenVINO runner takes the same compile options from its config table
(``OVOptions.from_table``) and compiles through ``compile_for``, so a device
that is not here is reported the same way everywhere: ``DeviceUnavailable``
(a ``ModelLoadError``) saying ``device GPU is not available here; available:
['CPU']``, raised before OpenVINO is asked (asking it for GPU without OpenCL
fails deep in plugin loading). Anything the compiler raises after that becomes
a ``ModelLoadError`` too.

Two precisions are distinct on purpose:

* ``precision`` is what the stored weights are (fp32, fp16, int8, int4); it
  changes the IR, so it is part of a cache key (see ``ov_precision``).
* ``inference_precision`` is what the device computes in: ``f32``, ``bf16``
  or ``f16``. On CPUs with bf16 support OpenVINO computes in bf16 unless told
  otherwise, and EfficientNet-Lite0's logits move by ~0.15.

``auto`` means two things, by runner. The runners that carry a reference
probe (all-MiniLM-L6-v2, EfficientNet-Lite0) read their options with
``from_table(table, measured=True)``: both precisions default to ``auto``, and
the runner measures which one to use on this device (see ``ov_choice``); a
value the user writes is used as written. A model of the user's own (kind
``openvino``) has nothing to check a precision against: its precisions default
to ``fp32``/``f32``, ``precision = "auto"`` is refused, and
``inference_precision = "auto"`` leaves the device's own default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import openvino as ov

from protocols.config import Table
from protocols.errors import ConfigError

from .errors import ModelLoadError

PERFORMANCE_HINTS = frozenset({"LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"})
AUTO = "auto"
PRECISIONS = frozenset({"fp32", "fp16", "int8", "int4"})
INFERENCE_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16", AUTO: None}
MAX_INFER_REQUESTS = 64
_PHYSICAL = r"[A-Z][A-Z0-9_]*(?:\.[0-9]+)?"
_DEVICE = re.compile(rf"(?:{_PHYSICAL}|(?:AUTO|MULTI|HETERO|BATCH):{_PHYSICAL}(?:,{_PHYSICAL})*)")
_VIRTUAL = frozenset({"AUTO", "MULTI", "HETERO", "BATCH"})


class DeviceUnavailable(ModelLoadError):
    """The configured device is not on this machine."""


@dataclass(frozen=True, slots=True)
class OVOptions:
    """How an OpenVINO model is compiled and scheduled; shared by every OpenVINO runner."""

    device: str = "CPU"
    performance_hint: str = "LATENCY"
    # Parallel infer requests; 0 takes the device's OPTIMAL_NUMBER_OF_INFER_REQUESTS.
    infer_requests: int = 0
    precision: str = "fp32"
    inference_precision: str = "f32"

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device {self.device!r} is not an OpenVINO device name")
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise ConfigError(f"performance_hint must be one of {sorted(PERFORMANCE_HINTS)}")
        if not 0 <= self.infer_requests <= MAX_INFER_REQUESTS:
            raise ConfigError(f"infer_requests must be 0 (auto) to {MAX_INFER_REQUESTS}")
        if self.precision not in PRECISIONS | {AUTO}:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS | {AUTO})}")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise ConfigError(f"inference_precision must be one of {sorted(INFERENCE_PRECISIONS)}")

    @classmethod
    def from_table(cls, table: Table, *, measured: bool = False) -> OVOptions:
        """Read ``device``, ``performance_hint``, ``infer_requests``, ``precision``,
        ``inference_precision`` (all optional) from ``table``; the caller calls ``done``.

        ``measured``: the runner can measure its precision (both default to ``auto``)."""
        device = table.text("device", "CPU")
        if not _DEVICE.fullmatch(device.upper()):
            raise ConfigError(
                f"{table.where}.device: expected an OpenVINO device such as CPU, GPU, GPU.1, "
                f"NPU or AUTO, got {device!r}"
            )
        hint = table.text("performance_hint", "LATENCY").upper()
        if hint not in PERFORMANCE_HINTS:
            raise ConfigError(
                f"{table.where}.performance_hint: expected one of {sorted(PERFORMANCE_HINTS)}, "
                f"got {hint!r}"
            )
        return cls(
            device=device.upper(),
            performance_hint=hint,
            infer_requests=table.integer("infer_requests", 0, high=MAX_INFER_REQUESTS),
            precision=table.text(
                "precision",
                AUTO if measured else "fp32",
                choices=PRECISIONS | {AUTO} if measured else PRECISIONS,
            ),
            inference_precision=table.text(
                "inference_precision", AUTO if measured else "f32", choices=INFERENCE_PRECISIONS
            ),
        )

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.performance_hint}
        hint = INFERENCE_PRECISIONS[self.inference_precision]
        if hint is not None:
            props["INFERENCE_PRECISION_HINT"] = hint
        return props


def candidates(device: str) -> tuple[str, tuple[str, ...]]:
    """``("AUTO", ("GPU", "CPU"))`` for ``AUTO:GPU,CPU``; ``("", ("GPU.1",))`` for ``GPU.1``."""
    head, sep, rest = device.partition(":")
    if sep:
        return head, tuple(rest.split(","))
    if head in _VIRTUAL:
        return head, ()
    return "", (head,)


def is_present(device: str, available: list[str]) -> bool:
    """Whether physical ``device`` (``GPU``, ``GPU.1``) is among ``available``.

    OpenVINO lists a lone GPU as ``GPU`` and several as ``GPU.0``, ``GPU.1``;
    ``GPU`` means the first of them and ``GPU.0`` the lone one.
    """
    if device in available:
        return True
    base, _, index = device.partition(".")
    if not index:
        return any(a.partition(".")[0] == base for a in available)
    return index == "0" and base in available


def check_device(device: str, available: list[str]) -> None:
    """Raise DeviceUnavailable unless ``device`` can run here."""
    virtual, wanted = candidates(device)
    present = [d for d in wanted if is_present(d, available)]
    if virtual == "AUTO" or (virtual == "" and not wanted):
        ok = not wanted or bool(present)  # AUTO falls back among what is there
    else:
        ok = len(present) == len(wanted)
    if not ok:
        missing = [d for d in wanted if d not in present]
        raise DeviceUnavailable(
            f"device {', '.join(missing)} is not available here; available: {available}"
        )


def compile_for(core: ov.Core, model: Any, options: OVOptions, name: str) -> ov.CompiledModel:
    """Compile ``model`` for ``options.device``; raise DeviceUnavailable or ModelLoadError."""
    try:
        available = list(core.available_devices)
    except Exception as exc:  # a broken plugin can make the listing itself fail
        raise ModelLoadError(f"{name}: cannot list OpenVINO devices: {exc}") from exc
    try:
        check_device(options.device, available)
    except DeviceUnavailable as exc:
        raise DeviceUnavailable(f"{name}: cannot compile for {options.device}: {exc}") from None
    try:
        return core.compile_model(model, options.device, options.properties())
    except Exception as exc:
        raise ModelLoadError(f"{name}: cannot compile for {options.device}: {exc}") from exc


def execution_devices(compiled: ov.CompiledModel, fallback: str) -> str:
    """What the compiled model really runs on (AUTO resolves to e.g. ``CPU``)."""
    try:
        devices = compiled.get_property("EXECUTION_DEVICES")
    except Exception:
        return fallback
    return ",".join(str(d) for d in devices) or fallback


def optimal_requests(compiled: ov.CompiledModel, configured: int) -> int:
    """``configured`` when set, else the device's optimal number of parallel requests."""
    if configured:
        return configured
    try:
        return max(
            1,
            min(MAX_INFER_REQUESTS, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))),
        )
    except Exception:
        return 1
