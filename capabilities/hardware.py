"""What this machine has: CPU, memory, OpenVINO devices, CUDA devices.

The probe feeds the node's capability record, which peers use to pick where a
job runs. It is one plain blocking function because parts of it are slow:
OpenVINO loads its device plugins, and importing torch to ask about CUDA takes
a second or two. The node runs it in a worker thread, once at start-up, and may
skip the CUDA part (``probe(cuda=False)``).

Nothing in it raises for a missing or broken device: a device that cannot be
queried is reported absent with the reason, because "this node has no GPU" is
an answer, not a failure.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True, slots=True)
class OpenVINODevice:
    name: str  # "CPU", "GPU.0", "NPU", ...
    full_name: str  # the device's FULL_DEVICE_NAME; empty when absent
    available: bool
    reason: str = ""  # why it is absent


@dataclass(frozen=True, slots=True)
class CudaDevice:
    index: int
    name: str
    total_memory: int  # bytes
    capability: tuple[int, int]  # compute capability (major, minor)


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu_model: str
    physical_cores: int
    logical_cores: int
    usable_cores: int  # logical cores this process may run on (affinity, containers)
    ram_total: int  # bytes
    ram_available: int  # bytes, at probe time
    openvino_devices: tuple[OpenVINODevice, ...]
    cuda_devices: tuple[CudaDevice, ...]
    cuda_status: str  # "ok", "skipped", "torch not installed", "no CUDA device", or an error

    def describe(self) -> dict[str, Any]:
        """Plain data for the capability record (msgpack-safe: no tuples of objects)."""
        return {
            "cpu": {
                "model": self.cpu_model,
                "physical_cores": self.physical_cores,
                "logical_cores": self.logical_cores,
                "usable_cores": self.usable_cores,
            },
            "ram": {"total": self.ram_total, "available": self.ram_available},
            "openvino": [
                {"name": d.name, "full_name": d.full_name, "available": d.available}
                | ({"reason": d.reason} if d.reason else {})
                for d in self.openvino_devices
            ],
            "cuda": [
                {
                    "index": d.index,
                    "name": d.name,
                    "total_memory": d.total_memory,
                    "capability": list(d.capability),
                }
                for d in self.cuda_devices
            ],
            "cuda_status": self.cuda_status,
        }


def probe(*, cuda: bool = True) -> Hardware:
    """Probe this machine. Blocks (up to seconds with ``cuda``): call it from a thread."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    memory = psutil.virtual_memory()
    cuda_devices, cuda_status = probe_cuda() if cuda else ((), "skipped")
    return Hardware(
        cpu_model=cpu_model(),
        physical_cores=physical,
        logical_cores=logical,
        usable_cores=_usable_cores(logical),
        ram_total=int(memory.total),
        ram_available=int(memory.available),
        openvino_devices=probe_openvino(),
        cuda_devices=cuda_devices,
        cuda_status=cuda_status,
    )


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name, or the best the platform module knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def probe_openvino() -> tuple[OpenVINODevice, ...]:
    """Each device OpenVINO lists, with its full name or the reason it is unusable."""
    try:
        import openvino as ov

        core = ov.Core()
        names = list(core.available_devices)
    except Exception as exc:  # no runtime, or a runtime that cannot start
        return (OpenVINODevice("openvino", "", False, _reason(exc)),)
    devices = []
    for name in names:
        try:
            full = str(core.get_property(name, "FULL_DEVICE_NAME"))
        except Exception as exc:
            devices.append(OpenVINODevice(name, "", False, _reason(exc)))
        else:
            devices.append(OpenVINODevice(name, full, True))
    return tuple(devices)


def probe_cuda() -> tuple[tuple[CudaDevice, ...], str]:
    """CUDA devices torch can use, and a status; imports torch (slow) only if installed."""
    if importlib.util.find_spec("torch") is None:
        return (), "torch not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return (), "no CUDA device"
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                CudaDevice(
                    index=index,
                    name=str(props.name),
                    total_memory=int(props.total_memory),
                    capability=(int(props.major), int(props.minor)),
                )
            )
    except Exception as exc:  # a driver that is present but broken
        return (), f"error: {_reason(exc)}"
    return tuple(devices), "ok"


def _usable_cores(logical: int) -> int:
    try:
        return len(os.sched_getaffinity(0)) or logical
    except (AttributeError, OSError):  # not Linux
        return logical


def _reason(exc: BaseException) -> str:
    """One short line: OpenVINO puts the useful part of its messages last."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"[:300]
