"""A remote runner whose server this node starts in a container, when it can.

``ContainedRunner`` wraps the runner that forwards to the server (the same one
as in API mode). On ``load`` it asks the container engine whether it runs; if
so it starts the container, waits for the server's health route, then loads
the inner runner. If there is no engine, it says so once, at start-up, in the
log and in ``swarm status`` ("no container engine (...): running in API
mode"), and loads the inner runner against the configured URL, as in API mode.
A container it started is stopped and removed on ``close``, and at once when
the health wait or the inner runner's load fails or is cancelled: a runner
that did not load leaves no container running.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..base import Runner, WrappedRunner
from . import container as engine_ops
from .container import ContainerConfig, EngineStatus

log = logging.getLogger(__name__)


class ContainedRunner(WrappedRunner):
    """``inner`` in front of a server this runner starts in a container (see the module)."""

    def __init__(self, inner: Runner, config: ContainerConfig, engine: str = "docker") -> None:
        super().__init__(inner, {"container": config.kind})
        self.config = config
        self.engine = engine
        self.engine_status: EngineStatus | None = None
        self._started = False  # a container of ours may be running: close stops it
        self._load_lock = trio.Lock()

    async def load(self) -> None:
        """Start the container (where an engine runs), wait for it, load ``inner``.

        Idempotent: a container already started is not started again. If any
        step fails or is cancelled, the container started is stopped and
        removed before the error leaves (``start`` itself leaves none behind).
        """
        async with self._load_lock:
            if not self._started:
                status = await trio.to_thread.run_sync(engine_ops.detect_engine, self.engine)
                self.engine_status = status
                if not status.available:
                    log.warning("%s: %s", self.info.name, status.describe())
                    await self.inner.load()
                    return
                argv = engine_ops.run_argv(self.config, self.engine)
                log.info("%s: starting %s", self.info.name, engine_ops.describe_argv(argv))
                await engine_ops.start(self.config, self.engine)
                self._started = True
            try:
                await engine_ops.wait_ready(self.config, self.config.ready_timeout_s)
                await self.inner.load()
            except BaseException:
                await self._stop()
                raise

    async def close(self) -> None:
        """Close ``inner``, then stop the container; both whatever the other does."""
        try:
            await self.inner.close()
        finally:
            await self._stop()

    async def _stop(self) -> None:
        if self._started:
            self._started = False
            await engine_ops.stop(self.config.name, self.engine)  # shielded, bounded

    def status(self) -> dict[str, Any] | None:
        inner = self.inner.status()
        mode = "container" if self._started else "api"
        engine = None if self.engine_status is None else self.engine_status.describe()
        return {**(inner or {}), "mode": mode, "engine": engine}
