"""What every runner in front of an HTTP backend shares: its endpoint's life and status.

A remote runner holds no model, only an ``Endpoint``. Each family (OpenAI
and TEI, OVMS) brings its config, which need only name the model, declare
the endpoint and bound a batch (``RemoteConfig``), and three hooks:
``_describe`` (the ModelInfo known before asking), ``_discover`` (ask the
server what it serves, refine ``info``, raise if the model is missing) and
``_status`` (the family's part of ``status``).

Lifecycle, the same for every family:

- ``load`` opens the endpoint and runs ``_discover``. If that fails, or is
  cancelled, the endpoint is closed before the error leaves: a runner that
  did not load holds no connection. A backend failure becomes
  ``ModelLoadError``, except a model the server says it lacks
  (``BackendModelMissing``, a ModelNotFound), which stays itself.
  ``load`` after a success does nothing; after a failure it tries afresh.
- ``close`` closes the endpoint, shielded from cancellation, so it completes
  from a cancelled scope too. It is safe whether ``load`` succeeded, failed,
  was cancelled or never ran, and twice.

``concurrency`` is the endpoint's ``max_concurrency``, so the node admits as
much work as the backend is allowed to take. Environment variables named for
keys are read when the runner is built, so a missing one fails at start.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from typing import Any, Generic, Protocol, TypeVar

import httpx
import trio

from ..base import InputSpec, ModelInfo, OutputSpec, Runner
from ..errors import ModelLoadError, RunnerError
from .config import EndpointConfig
from .endpoint import Endpoint
from .errors import BackendError, BackendModelMissing

HEALTH_TIMEOUT_S = 5.0


class RemoteConfig(Protocol):
    """What the shared lifecycle needs of a family's config."""

    @property
    def name(self) -> str:
        """The swarm's name for the model."""
        ...

    @property
    def endpoint(self) -> EndpointConfig: ...

    @property
    def max_batch(self) -> int: ...


C = TypeVar("C", bound=RemoteConfig)


class RemoteRunner(Runner, Generic[C]):
    """A runner whose model lives on an HTTP server (see the module).

    ``transport`` (tests) is handed to the endpoint's httpx client, which owns
    it from then on and closes it with the endpoint. ``environ`` stands in for
    ``os.environ`` when keys named by ``key_env`` are read.
    """

    def __init__(
        self,
        config: C,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        config.endpoint.resolve_keys(os.environ if environ is None else environ)
        self.config = config
        self._transport = transport
        self._environ = environ
        self._endpoint: Endpoint | None = None
        self._loaded = False
        self._load_lock = trio.Lock()
        self.concurrency = config.endpoint.max_concurrency
        self.info = self._describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.name!r}, {self.config.endpoint.base_url!r})"

    # -- the family's hooks -------------------------------------------------------------

    @abc.abstractmethod
    def _describe(self) -> ModelInfo:
        """The ModelInfo known before asking the server (see ``_remote_info``)."""

    @abc.abstractmethod
    async def _discover(self) -> None:
        """Ask the server what it serves; refine ``self.info``; raise if the model is missing."""

    @abc.abstractmethod
    def _status(self) -> dict[str, Any]:
        """The family's part of ``status``: the model as the server names it, and so on."""

    @abc.abstractmethod
    def _health_path(self) -> str:
        """The route that answers 2xx when the server is up."""

    def _remote_info(
        self,
        task: str,
        runner: str,
        inputs: tuple[InputSpec, ...],
        outputs: tuple[OutputSpec, ...],
        extra: Mapping[str, str | int | float | bool],
        *,
        streams: bool = False,
        context_length: int | None = None,
    ) -> ModelInfo:
        """What every remote model announces alike: its name and batch limit from the
        config, a remote device, a precision the server does not tell."""
        return ModelInfo(
            name=self.config.name,
            task=task,
            runner=runner,
            device="remote",
            precision="unknown",
            max_batch=self.config.max_batch,
            inputs=inputs,
            outputs=outputs,
            context_length=context_length,
            streams=streams,
            extra=extra,
        )

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise RunnerError(f"{self.config.name}: not loaded")
        return self._endpoint

    async def load(self) -> None:
        """Open the endpoint and check the model is there (see the module). Idempotent."""
        async with self._load_lock:
            if self._loaded:
                return
            endpoint = Endpoint(
                self.config.endpoint, transport=self._transport, environ=self._environ
            )
            self._endpoint = endpoint
            try:
                await self._discover()
            except BaseException as exc:
                if self._endpoint is endpoint:
                    self._endpoint = None
                with trio.CancelScope(shield=True):
                    await endpoint.aclose()
                if isinstance(exc, BackendError) and not isinstance(exc, BackendModelMissing):
                    raise ModelLoadError(f"{self.config.name}: cannot load: {exc}") from exc
                raise
            if self._endpoint is not endpoint:  # closed while it loaded: stays closed
                raise RunnerError(f"{self.config.name}: closed while loading")
            self._loaded = True

    async def close(self) -> None:
        """Close the endpoint, if open; shielded, idempotent, safe in any state."""
        endpoint, self._endpoint = self._endpoint, None
        self._loaded = False
        if endpoint is not None:
            with trio.CancelScope(shield=True):
                await endpoint.aclose()

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The model's name, the family's part, whether it is loaded, and the endpoint's
        status (None when not open; never a key, only labels)."""
        return {
            "name": self.config.name,
            **self._status(),
            "loaded": self._loaded,
            "endpoint": None if self._endpoint is None else self._endpoint.status(),
        }

    async def healthy(self) -> bool:
        """Whether the server answers its health route."""
        try:
            await self.endpoint.call_raw(
                "GET", self._health_path(), idempotent=True, timeout_s=HEALTH_TIMEOUT_S
            )
        except BackendError:
            return False
        return True
