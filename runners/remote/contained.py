"""A remote runner whose server this node starts in a container, when it can.

``ContainedRunner`` wraps the runner that forwards to the server (the same one
as in API mode). On ``load`` it asks the container engine whether it runs; if
so it starts the container, waits for the server's health route, then loads
the inner runner. If there is no engine, it says so once, at start-up, in the
log and in ``swarm status`` ("no container engine (...): running in API
mode"), and loads the inner runner against the configured URL, as in API mode.
A container it started is stopped on ``close``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import trio

from protocols import Param, Value

from ..base import Outputs, Runner, opened_stream
from . import container as engine_ops
from .container import ContainerConfig, EngineStatus

log = logging.getLogger(__name__)


class ContainedRunner(Runner):
    def __init__(self, inner: Runner, config: ContainerConfig, engine: str = "docker") -> None:
        self.inner = inner
        self.config = config
        self.engine = engine
        self.info = replace(inner.info, extra={**inner.info.extra, "container": config.kind})
        self.concurrency = inner.concurrency
        self.engine_status: EngineStatus | None = None
        self._started = False

    async def load(self) -> None:
        status = await trio.to_thread.run_sync(engine_ops.detect_engine, self.engine)
        self.engine_status = status
        if status.available:
            argv = engine_ops.run_argv(self.config, self.engine)
            log.info("%s: starting %s", self.info.name, engine_ops.describe_argv(argv))
            await engine_ops.start(self.config, self.engine)
            self._started = True
            await engine_ops.wait_ready(self.config)
        else:
            log.warning("%s: %s", self.info.name, status.describe())
        await self.inner.load()

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self.inner.check(inputs, params)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        return await self.inner.infer(inputs, params)

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        async with opened_stream(self.inner, inputs, params) as chunks:
            async for chunk in chunks:
                yield chunk

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            if self._started:
                with trio.CancelScope(shield=True):
                    await engine_ops.stop(self.config.name, self.engine)
                self._started = False

    def status(self) -> dict[str, Any] | None:
        inner = self.inner.status()
        mode = "container" if self._started else "api"
        engine = None if self.engine_status is None else self.engine_status.describe()
        return {**(inner or {}), "mode": mode, "engine": engine}
