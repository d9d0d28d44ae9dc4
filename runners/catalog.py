"""Which models a node can serve, named the way a user writes them.

A model spec is the string given to ``swarm daemon --model`` or in config.toml.
It is parsed once, at the top, into a frozen ``ModelSpec``; ``build_runner``
turns that into a runner. The grammar is small on purpose::

    all-minilm-l6-v2           the embedded default: all-MiniLM-L6-v2 on OpenVINO CPU
                               (any letter case, so all-MiniLM-L6-v2 works too)
    fake:NAME                  a FakeRunner serving NAME, answering at once
    fake:NAME:LATENCY_MS       ... answering after LATENCY_MS milliseconds

Errors: ``ModelSpecError`` (a ``SwarmError``, code BAD_REQUEST) for a spec that
does not parse, with a message that lists what is available.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from protocols import ErrorCode, SwarmError

from .base import Runner
from .fake import FakeRunner
from .openvino_embed import MODEL_NAME as MINILM
from .openvino_embed import OpenVINOEmbedRunner

DEFAULT_MODEL = MINILM
MAX_FAKE_LATENCY_MS = 3_600_000.0
AVAILABLE = f"{MINILM} (the default), fake:NAME, fake:NAME:LATENCY_MS"
_FAKE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelSpecError(SwarmError):
    """A model spec that names nothing this node can serve."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A parsed model spec: which runner, serving which model name."""

    kind: Literal["openvino-embed", "fake"]
    name: str
    latency_ms: float = 0.0  # fake only

    def __str__(self) -> str:
        """The canonical spec string: ``parse_model_spec(str(spec)) == spec``."""
        if self.kind == "fake":
            latency = f":{self.latency_ms!r}" if self.latency_ms else ""
            return f"fake:{self.name}{latency}"
        return self.name


def parse_model_spec(text: str) -> ModelSpec:
    """Parse one spec string; raise ModelSpecError naming what is available."""
    spec = text.strip()
    if spec.lower() == MINILM:
        return ModelSpec("openvino-embed", MINILM)
    kind, _, rest = spec.partition(":")
    if kind.lower() != "fake" or not rest:
        raise ModelSpecError(f"unknown model {text!r}; available: {AVAILABLE}")
    name, _, latency = rest.partition(":")
    if not _FAKE_NAME.fullmatch(name):
        raise ModelSpecError(
            f"fake model name {name!r} must be 1 to 128 letters, digits, '.', '_' or '-'"
        )
    if not latency:
        return ModelSpec("fake", name)
    try:
        latency_ms = float(latency)
    except ValueError:
        latency_ms = math.nan
    if not 0 <= latency_ms <= MAX_FAKE_LATENCY_MS:
        raise ModelSpecError(
            f"fake model latency {latency!r} must be milliseconds from 0 to {MAX_FAKE_LATENCY_MS:g}"
        )
    return ModelSpec("fake", name, latency_ms)


def build_runner(spec: ModelSpec | str, models_dir: Path) -> Runner:
    """A runner (not loaded yet) for ``spec``; ``models_dir`` holds converted models."""
    parsed = parse_model_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "fake":
        return FakeRunner(parsed.name, latency_s=parsed.latency_ms / 1000)
    return OpenVINOEmbedRunner(models_dir)
