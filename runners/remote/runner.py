"""What every runner in front of an HTTP backend shares: its endpoint's life and status.

A remote runner holds no model, only an ``Endpoint``: ``load`` opens it and
asks the server what it serves (``_discover``), ``close`` closes it. Its
``concurrency`` is the endpoint's ``max_concurrency``, so the node admits as
much work as the backend is allowed to take. Environment variables named
for keys are read when the runner is built, so a missing one fails at start.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from ..base import InputSpec, ModelInfo, OutputSpec, Runner
from ..errors import ModelLoadError, RunnerError
from .endpoint import Endpoint
from .errors import BackendError

if TYPE_CHECKING:
    from .openai_compat import OpenAICompatConfig

HEALTH_TIMEOUT_S = 5.0


class RemoteRunner(Runner):
    """A runner whose model lives on an HTTP server (see the module)."""

    def __init__(self, config: OpenAICompatConfig, **endpoint_options: Any) -> None:
        environ = endpoint_options.get("environ")
        config.endpoint.resolve_keys(os.environ if environ is None else environ)
        self.config = config
        self._options = endpoint_options
        self._endpoint: Endpoint | None = None
        self.concurrency = config.endpoint.max_concurrency
        # LoRA adapters the server has, where the flavor tells (None: not known).
        self.adapters: frozenset[str] | None = None
        self.info = self._describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r}, {self.config.endpoint.base_url!r})"

    @abc.abstractmethod
    def _describe(self) -> ModelInfo:
        """The ModelInfo known before asking the server (see ``_remote_info``)."""

    def _remote_info(
        self,
        task: str,
        runner: str,
        inputs: tuple[InputSpec, ...],
        outputs: tuple[OutputSpec, ...],
        extra: Mapping[str, str | int | float | bool],
        *,
        streams: bool = False,
    ) -> ModelInfo:
        """What every remote model announces alike: its name and limits from the
        config, a remote device, a precision the server does not tell."""
        c = self.config
        return ModelInfo(
            name=c.name,
            task=task,
            runner=runner,
            device="remote",
            precision="unknown",
            max_batch=c.max_batch,
            inputs=inputs,
            outputs=outputs,
            context_length=c.context_length,
            streams=streams,
            extra=extra,
        )

    @abc.abstractmethod
    async def _discover(self) -> None:
        """Ask the server what it serves; refine ``self.info``; raise if the model is missing."""

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise RunnerError(f"{self.config.name}: not loaded")
        return self._endpoint

    async def load(self) -> None:
        """Open the endpoint and check the model is there. Idempotent."""
        if self._endpoint is not None:
            return
        self._endpoint = Endpoint(self.config.endpoint, **self._options)
        try:
            await self._discover()
        except BaseException as exc:
            endpoint, self._endpoint = self._endpoint, None
            with trio.CancelScope(shield=True):
                await endpoint.aclose()
            if isinstance(exc, BackendError):
                raise ModelLoadError(f"{self.config.name}: cannot load: {exc}") from exc
            raise

    async def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            await endpoint.aclose()

    def status(self) -> dict[str, Any]:
        """The endpoint's status (no secrets) and the model as the server named it."""
        base: dict[str, Any] = {
            "model": self.config.model,
            "api": self.config.api,
            "flavor": self.config.flavor,
        }
        if self._endpoint is None:
            return {**base, "name": self.config.name, "loaded": False}
        return {**base, **self._endpoint.status(), "loaded": True}

    async def healthy(self) -> bool:
        """Whether the server answers its health route (vLLM, TEI) or lists its models."""
        path = (
            "/health" if self.config.flavor == "vllm" or self.config.api == "tei" else "/v1/models"
        )
        try:
            await self.endpoint.call_raw("GET", path, idempotent=True, timeout_s=HEALTH_TIMEOUT_S)
        except BackendError:
            return False
        return True
