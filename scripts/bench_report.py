"""What every benchmark's report shares: the targets summary and the machine's CPU."""

from __future__ import annotations

import os
import platform
from contextlib import suppress
from pathlib import Path


class Summary(list[dict[str, str]]):
    """The targets table: one row per figure with its target and verdict."""

    def add(self, figure: str, value: str, target: str, ok: bool) -> None:
        self.append(
            {
                "figure": figure,
                "value": value,
                "target": target,
                "verdict": "met" if ok else "NOT met",
            }
        )


def cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_now() -> str:
    """The 1, 5 and 15-minute load averages: every figure here shares the cores."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, object]:
    """The machine a run is on, with the load at its start (``load_before``); the
    caller adds ``load_after`` (``load_now()``) when it ends."""
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "load_before": load_now(),
    }
