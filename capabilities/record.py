"""The body of a node's capability record, built from typed parts.

A capability record tells peers what a node is (hardware), what it serves
(models) and how busy it is (load), so their routers can score it. The wire's
``CapabilityRecord`` carries the body as plain msgpack data; this module is the
one place that decides its shape, so the node and the tests agree on it.
Signing and sequence numbers belong to the record, not the body, and live with
the code that publishes it.

The body, schema 1::

    {"schema": 1,
     "software": {"name": "swarm-node", "version": "0.1.0"},
     "addrs": ["/ip4/.../tcp/.../p2p/..."],
     "hardware": Hardware.describe(),
     "models": [ModelInfo.describe(), ...],
     "load": Load.describe()}
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocols import Priority
from runners.base import ModelInfo

from .hardware import Hardware

SCHEMA = 1
DISTRIBUTION = "swarm-node"


def _idle_queues() -> Mapping[str, int]:
    return {p.name.lower(): 0 for p in Priority}


@dataclass(frozen=True, slots=True)
class Load:
    """How busy the node is right now."""

    queue_depth: Mapping[str, int] = field(default_factory=_idle_queues)  # per priority name
    in_flight: int = 0
    ewma_latency_ms: float | None = None  # None until something has run
    tokens_per_s: float | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "queue_depth": dict(self.queue_depth),
            "in_flight": self.in_flight,
            "ewma_latency_ms": self.ewma_latency_ms,
            "tokens_per_s": self.tokens_per_s,
        }


@functools.cache  # a metadata lookup reads files; the answer cannot change while we run
def software_version() -> str:
    """This node's package version ("unknown" when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def record_body(
    *,
    hardware: Hardware,
    models: Sequence[ModelInfo],
    load: Load,
    addrs: Sequence[str] = (),
    version: str | None = None,
) -> dict[str, Any]:
    """The plain-data body of this node's capability record (see the module docstring)."""
    return {
        "schema": SCHEMA,
        "software": {
            "name": DISTRIBUTION,
            "version": software_version() if version is None else version,
        },
        "addrs": list(addrs),
        "hardware": hardware.describe(),
        "models": [m.describe() for m in models],
        "load": load.describe(),
    }
