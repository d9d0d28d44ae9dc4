"""The models this node serves: built from their specs, loaded, unloaded, closed.

The registry owns every runner it builds, from the moment it is built: one that
fails to load (or whose load is cancelled, or that was built beside a spec that
did not validate) is closed at once, and ``close`` closes the rest, so nothing
a runner started (a container, an HTTP client, a converter) outlives the node.

Only declared models can be loaded on request: a peer or an HTTP client names
a model, never a path, and what it names must be in this node's config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from protocols import SwarmError
from protocols.errors import ConfigError
from runners.base import CONTENT_DIR, ModelInfo, Runner
from runners.catalog import ModelSpec, build_runner, parse_model_spec
from runners.errors import ModelNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Change:
    """What a load or unload on request did (the gateway's and MCP's answer)."""

    model: str
    state: str  # "loaded" or "unloaded"
    changed: bool

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "state": self.state, "changed": self.changed}


class ModelRegistry:
    """Runners by name: the loaded ones serve, the failed ones are kept with why."""

    def __init__(
        self,
        specs: Sequence[str | ModelSpec],
        models_dir: Path,
        *,
        extra: Sequence[Runner] = (),
    ) -> None:
        """``extra``: runners built in code, served beside the declared ones."""
        self._specs = tuple(s if isinstance(s, ModelSpec) else parse_model_spec(s) for s in specs)
        self._models_dir = models_dir
        self._extra = tuple(extra)
        self.runners: dict[str, Runner] = {}  # loaded, by name as declared
        self.failed: dict[str, str] = {}  # name -> why it did not load
        # Declared with a content id whose files are not here yet: the node pulls
        # them from peers, then loads the model (name -> content id).
        self.pending: dict[str, str] = {
            s.name: cid
            for s in self._specs
            if (cid := getattr(s.config, "content", None))
            and not (models_dir / CONTENT_DIR / cid).is_dir()
        }

    # -- lifecycle ------------------------------------------------------------------

    async def load_all(self) -> None:
        """Build and load every declared model, at once.

        A model that fails to load (a file that does not convert, a backend that
        does not answer, a device that is absent) is closed and left out with its
        reason, shown in ``swarm status``; the node serves the others. A spec
        that cannot be built, or a name given twice, is a ConfigError, after the
        runners already built are closed.
        """
        built: list[Runner] = []
        try:
            for spec in self._specs:
                if spec.name in self.pending:
                    continue
                built.append(build_runner(spec, self._models_dir))
            built += self._extra
            names = [r.info.name.lower() for r in built]
            if len(set(names)) != len(names):
                raise ConfigError(f"a model is configured twice: {names}")
            async with trio.open_nursery() as nursery:
                for runner in built:
                    nursery.start_soon(self._load_one, runner)
        except BaseException:
            await _close_all([*built, *(r for r in self._extra if r not in built)])
            self.runners.clear()
            raise
        # Declaration order, not the order the loads finished in.
        self.runners = {r.info.name: r for r in built if self.runners.get(r.info.name) is r}

    async def _load_one(self, runner: Runner) -> None:
        try:
            await runner.load()
        except SwarmError as exc:
            log.error("model %s did not load: %s", runner.info.name, exc)
            self.failed[runner.info.name] = str(exc)
            await _close_all([runner])
        else:
            self.runners[runner.info.name] = runner

    async def close(self) -> None:
        """Close every runner still held; each is closed once, whatever else fails."""
        runners, self.runners = list(self.runners.values()), {}
        await _close_all(runners)

    # -- on request -------------------------------------------------------------------

    def declared(self) -> dict[str, ModelSpec]:
        return {s.name.lower(): s for s in self._specs}

    def find(self, name: str) -> str | None:
        """The served name matching ``name`` (any case), or None."""
        return next((n for n in self.runners if n.lower() == name.lower()), None)

    async def load(self, name: str) -> tuple[Runner | None, Change]:
        """Load a declared model this node does not serve now.

        The runner, or None when it already served; raises ModelNotFound for an
        undeclared name, and the runner's error when it does not load (kept for
        ``swarm status``; the runner is closed).
        """
        spec = self.declared().get(name.lower())
        if spec is None:
            declared = sorted(s.name for s in self._specs)
            raise ModelNotFound(
                f"{name!r} is not declared in this node's config; declared: {declared}"
            )
        if spec.name in self.runners:
            return None, Change(spec.name, "loaded", changed=False)
        runner = build_runner(spec, self._models_dir)
        try:
            await runner.load()
        except BaseException as exc:
            if isinstance(exc, SwarmError):
                self.failed[spec.name] = str(exc)
            await _close_all([runner])
            raise
        self.failed.pop(spec.name, None)
        self.pending.pop(spec.name, None)
        self.runners[runner.info.name] = runner
        return runner, Change(runner.info.name, "loaded", changed=True)

    def take(self, name: str) -> Runner:
        """Stop holding the served model ``name`` (the caller drains and closes it).

        Raises ModelNotFound when it is not served here.
        """
        found = self.find(name)
        if found is None:
            raise ModelNotFound(f"this node does not serve {name!r}")
        return self.runners.pop(found)

    # -- what it tells ---------------------------------------------------------------

    def infos(self) -> list[ModelInfo]:
        return [r.info for r in self.runners.values()]

    def status(self) -> dict[str, dict[str, Any]]:
        """Each runner's live state (circuit breaker, batching), for status and records.

        Backend addresses stay on this node: peers and clients learn the state of
        a model's backend, not where it is.
        """
        out = {}
        for name, runner in self.runners.items():
            state = runner.status()
            if state:
                out[name] = _without(state, "base_url")
        return out

    def circuits(self) -> dict[str, str]:
        """Each remote model's backend breaker state (records and routing read it)."""
        return {
            name: breaker
            for name, state in self.status().items()
            if isinstance(breaker := _find(state, "breaker"), str)
        }


async def _close_all(runners: Sequence[Runner]) -> None:
    """Close each runner, shielded (this runs while the node stops too); a close that
    fails is logged and the others are still closed."""
    with trio.CancelScope(shield=True):
        for runner in runners:
            try:
                await runner.close()
            except Exception:
                log.exception("model %s did not close cleanly", runner.info.name)


def _without(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``data`` without ``key`` at any depth."""
    return {
        k: _without(v, key) if isinstance(v, Mapping) else v for k, v in data.items() if k != key
    }


def _find(data: Mapping[str, Any], key: str) -> Any:
    """The first value of ``key`` at any depth of ``data`` (None if absent)."""
    if key in data:
        return data[key]
    for value in data.values():
        if isinstance(value, Mapping) and (found := _find(value, key)) is not None:
            return found
    return None
