"""A model served by an OpenVINO Model Server the node can reach, as a swarm runner.

OVMS speaks two REST protocols; ``api`` picks one per backend declaration:

- ``kserve`` (KServe v2, ``/v2/...``): ``load`` asks the model is ready
  (``/v2/models/{m}[/versions/{v}]/ready``) and reads its metadata, which
  becomes ``info.inputs`` and ``info.outputs`` (exact datatypes, shapes with -1
  as any size), so a wrong dtype or shape is refused here, before anything is
  sent;
- ``tfserving`` (``/v1/...``): ``load`` reads the model's version statuses (one
  must be AVAILABLE, the pinned one if ``version`` is set) and its signature;
  ``infer`` posts ``:predict`` in columnar (``inputs``) or row (``instances``)
  format, or forwards a caller's own JSON ``instances`` given as the param
  ``instances``. ``reload_config`` and ``config_status`` drive OVMS's
  ``/v1/config/reload`` and ``/v1/config``.

Transport (limits, retries, breaker, keys) is the ``Endpoint``'s. Errors:
an unknown model or version (HTTP 404) -> ``BackendModelMissing`` (a
ModelNotFound: MODEL_NOT_FOUND); inputs the server refuses -> ``BackendRejected``
(a BadInput: BAD_REQUEST); an answer that does not check -> ``BackendGarbage``;
a server that cannot be reached -> ``BackendUnreachable`` (NOT_EXECUTED).

Its lifecycle and status are every remote runner's (``runner.RemoteRunner``):
``load`` opens the endpoint and reads the model's status and metadata; a load
that fails or is cancelled closes the endpoint again; an unknown model stays
``BackendModelMissing``, any other backend failure becomes ``ModelLoadError``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from protocols import Param, Tensor, Value
from protocols.config import Table
from protocols.errors import ConfigError

from ..base import InputSpec, ModelInfo, Outputs, OutputSpec, check_inputs
from ..errors import BadInput, ModelLoadError
from . import kserve_v2, tfserving
from .config import EndpointConfig
from .errors import BackendBusy, BackendGarbage, BackendModelMissing, BackendRejected
from .runner import RemoteRunner

APIS = ("kserve", "tfserving")
FORMATS = ("columnar", "rows")
MAX_INSTANCES_CHARS = 64 * 2**20
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class OVMSConfig:
    """One OVMS model behind one endpoint. ``version`` None is the latest the server has."""

    endpoint: EndpointConfig
    model: str  # the model's name on the server
    served_name: str  # the name the swarm knows it by
    api: str = "kserve"
    version: int | None = None
    task: str = "inference"
    tfs_format: str = "columnar"
    binary: bool = False  # KServe v2 binary tensor extension, both ways
    signature: str = tfserving.DEFAULT_SIGNATURE
    max_batch: int = 64
    text_max_items: int = 256
    text_max_chars: int = 65536

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ConfigError(f"api: expected one of {list(APIS)}, got {self.api!r}")
        if self.tfs_format not in FORMATS:
            raise ConfigError(f"tfs_format: expected one of {list(FORMATS)}")
        if not self.model or not self.served_name or not self.task:
            raise ConfigError("model, served_name and task must not be empty")
        if self.version is not None and self.version < 1:
            raise ConfigError("version: expected a version number from 1, or 'latest'")
        if min(self.max_batch, self.text_max_items, self.text_max_chars) < 1:
            raise ConfigError("max_batch, text_max_items and text_max_chars must be at least 1")

    @property
    def name(self) -> str:
        """The swarm's name for the model (``RemoteConfig``)."""
        return self.served_name

    @property
    def version_text(self) -> str | None:
        return None if self.version is None else str(self.version)

    @classmethod
    def from_table(cls, table: Table) -> OVMSConfig:
        """Read the endpoint's fields and these from ``table``; the caller calls ``done()``.

        ``model`` (required), ``served_name`` (default: model), ``api``
        ("kserve" or "tfserving"), ``version`` (a number, or "latest": the
        default), ``task``, ``tfs_format`` ("columnar" or "rows"),
        ``binary`` (KServe's binary tensor extension; default false), ``signature``,
        ``max_batch``, ``text_max_items``, ``text_max_chars``.
        """
        endpoint = EndpointConfig.from_table(table)
        model = table.text("model")
        version: int | None = None
        if isinstance(table.data.get("version"), str):
            table.text("version", choices=("latest",))
        else:
            version = table.integer("version", None, low=1)
        try:
            return cls(
                endpoint=endpoint,
                model=model,
                served_name=table.text("served_name", model),
                api=table.text("api", "kserve", choices=APIS),
                version=version,
                task=table.text("task", "inference"),
                tfs_format=table.text("tfs_format", "columnar", choices=FORMATS),
                binary=table.flag("binary", False),
                signature=table.text("signature", tfserving.DEFAULT_SIGNATURE),
                max_batch=table.integer("max_batch", 64, low=1, high=2**20),
                text_max_items=table.integer("text_max_items", 256, low=1, high=2**20),
                text_max_chars=table.integer("text_max_chars", 65536, low=1, high=2**26),
            )
        except ConfigError as exc:
            raise ConfigError(f"{table.where}.{exc}") from None


def build_ovms_runner(config: OVMSConfig) -> OVMSRunner:
    """An unloaded runner; ``load`` reaches the server."""
    return OVMSRunner(config)


class OVMSRunner(RemoteRunner[OVMSConfig]):
    """Forwards inference to one OVMS model (see the module)."""

    def __init__(
        self,
        config: OVMSConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._outputs: dict[str, str] = {}  # name -> swarm dtype, or "text"
        self._model_status: dict[str, Any] = {}
        super().__init__(config, transport=transport, environ=environ)

    def _describe(
        self,
        inputs: tuple[InputSpec, ...] = (),
        outputs: tuple[OutputSpec, ...] = (),
        **extra: str,
    ) -> ModelInfo:
        c = self.config
        return self._remote_info(
            c.task,
            "ovms",
            inputs,
            outputs,
            {
                "backend": c.endpoint.name,
                "api": c.api,
                "server_model": c.model,
                "version": c.version_text or "latest",
                **extra,
            },
        )

    def _status(self) -> dict[str, Any]:
        """The model as last seen: its version statuses, readiness."""
        c = self.config
        return {
            "model": c.model,
            "api": c.api,
            "version": c.version_text or "latest",
            "model_status": dict(self._model_status),
        }

    def _health_path(self) -> str:
        return kserve_v2.SERVER_READY  # OVMS serves it whichever API a model is used by

    # -- discovery (the shared ``load`` runs it) ------------------------------------

    async def _discover(self) -> None:
        if self.config.api == "kserve":
            await self._load_kserve()
        else:
            await self._load_tfserving()

    async def _load_kserve(self) -> None:
        c = self.config
        await self._call("GET", kserve_v2.ready_path(c.model, c.version_text), None)
        body = await self._call("GET", kserve_v2.model_path(c.model, c.version_text), None)
        meta = kserve_v2.parse_metadata(body, f"{c.endpoint.name}: metadata of {c.model}")
        self._outputs = {
            m.name: "text" if m.datatype == kserve_v2.BYTES else kserve_v2.V2_DTYPES[m.datatype]
            for m in meta.outputs
        }
        specs = kserve_v2.input_specs(meta, max_items=c.text_max_items, max_chars=c.text_max_chars)
        self._model_status = {"ready": True, "versions": list(meta.versions)}
        outputs = kserve_v2.output_specs(meta)
        self.info = self._describe(specs, outputs, platform=meta.platform or "unknown")

    async def _load_tfserving(self) -> None:
        c = self.config
        statuses = await self.version_status()
        available = [s for s in statuses if s.state == "AVAILABLE"]
        if not available:
            states = ", ".join(f"{s.version}: {s.state}" for s in statuses) or "none"
            raise ModelLoadError(f"{c.served_name}: no version of {c.model} available ({states})")
        path = tfserving.metadata_path(c.model, c.version_text)
        body = await self._call("GET", path, None)
        sig = tfserving.parse_metadata(
            body, f"{c.endpoint.name}: metadata of {c.model}", c.signature
        )
        self._outputs = {name: kind for name, (kind, _) in sig.outputs.items()}
        specs = tfserving.input_specs(sig, max_items=c.text_max_items, max_chars=c.text_max_chars)
        self.info = self._describe(specs, tfserving.output_specs(sig))

    # -- inference ----------------------------------------------------------------

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        fmt = params.get("format", self.config.tfs_format)
        if fmt not in FORMATS:
            raise BadInput(f"{self.config.served_name}: param 'format' is one of {list(FORMATS)}")
        if "instances" in params:
            _check_preformatted(self.config, inputs, params["instances"])
            return
        check_inputs(self.info, inputs)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        self.check(inputs, params)  # never send what the model cannot take
        c = self.config
        where = f"{c.endpoint.name}: {c.model}"
        if c.api == "kserve":
            request_id = f"swarm-{next(_ids)}"
            path = kserve_v2.infer_path(c.model, c.version_text)
            if c.binary:
                content, length = kserve_v2.encode_binary_request(inputs, request_id=request_id)
                headers = {
                    kserve_v2.HEADER_LENGTH: str(length),
                    "Content-Type": "application/octet-stream",
                }
                data = await self._call("POST", path, content, headers=headers)
                outputs = kserve_v2.decode_binary_response(
                    data, where, expect=self._outputs, request_id=request_id
                )
            else:
                body = kserve_v2.encode_request(inputs, request_id=request_id)
                answer = await self._call("POST", path, body)
                outputs = kserve_v2.decode_response(
                    answer, where, expect=self._outputs, request_id=request_id
                )
        else:
            instances = params.get("instances")
            fmt = params.get("format", c.tfs_format)
            if isinstance(instances, str):
                body = tfserving.encode_preformatted(instances, c.signature)
            elif fmt == "rows":
                body = tfserving.encode_rows(inputs, c.signature)
            else:
                body = tfserving.encode_columnar(inputs, c.signature)
            answer = await self._call("POST", tfserving.predict_path(c.model, c.version_text), body)
            outputs = tfserving.decode_predict(answer, where, outputs=self._outputs)
        self._check_kinds(outputs, where)
        return outputs

    def _check_kinds(self, outputs: Mapping[str, Value], where: str) -> None:
        for name, want in self._outputs.items():
            value = outputs.get(name)
            got = value.dtype if isinstance(value, Tensor) else "text"
            if value is not None and got != want:
                raise BackendGarbage(f"{where}: output {name!r} is {got}, metadata says {want}")

    # -- status and management ----------------------------------------------------

    async def version_status(self) -> tuple[tfserving.VersionStatus, ...]:
        """TF-Serving model status: each version's state (AVAILABLE, LOADING, ...)."""
        c = self.config
        body = await self._call("GET", tfserving.model_path(c.model, c.version_text), None)
        statuses = tfserving.parse_model_status(body, f"{c.endpoint.name}: status of {c.model}")
        self._model_status = {"versions": [s.describe() for s in statuses]}
        return statuses

    async def model_ready(self) -> bool:
        """KServe v2 model readiness; False while the server says it is loading (503)."""
        c = self.config
        try:
            await self._call("GET", kserve_v2.ready_path(c.model, c.version_text), None)
        except BackendBusy:
            self._model_status["ready"] = False
            return False
        self._model_status["ready"] = True
        return True

    async def server_health(self) -> dict[str, bool]:
        """KServe v2 server liveness and readiness (200: yes; 503 or 4xx: no)."""
        health = {}
        for key, path in (("live", kserve_v2.SERVER_LIVE), ("ready", kserve_v2.SERVER_READY)):
            try:
                await self.endpoint.call_json("GET", path, idempotent=True)
                health[key] = True
            except (BackendBusy, BackendRejected):
                health[key] = False
        return health

    async def reload_config(self) -> dict[str, tuple[tfserving.VersionStatus, ...]]:
        """OVMS ``POST /v1/config/reload``: apply its config file; every model's status after."""
        body = await self.endpoint.call_json(
            "POST", tfserving.CONFIG_RELOAD, body={}, idempotent=False
        )
        return tfserving.parse_config_status(body, f"{self.config.endpoint.name}: config reload")

    async def config_status(self) -> dict[str, tuple[tfserving.VersionStatus, ...]]:
        """OVMS ``GET /v1/config``: every served model's version statuses."""
        body = await self.endpoint.call_json("GET", tfserving.CONFIG_STATUS, idempotent=True)
        return tfserving.parse_config_status(body, f"{self.config.endpoint.name}: config")

    async def _call(
        self, method: str, path: str, body: Any, headers: Mapping[str, str] | None = None
    ) -> Any:
        """One call (raw bytes both ways when ``body`` is bytes); a 404 means the server
        has no such model (or version)."""
        try:
            if isinstance(body, bytes):
                return await self.endpoint.call_raw(
                    method, path, content=body, headers=headers, idempotent=True
                )
            return await self.endpoint.call_json(method, path, body=body, idempotent=True)
        except BackendRejected as exc:
            if exc.status == 404:
                raise BackendModelMissing(str(exc), status=404) from exc
            raise


def _check_preformatted(config: OVMSConfig, inputs: Mapping[str, Value], text: Param) -> None:
    if config.api != "tfserving":
        raise BadInput(f"{config.served_name}: param 'instances' needs api = tfserving")
    if inputs:
        raise BadInput(f"{config.served_name}: give inputs or param 'instances', not both")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_INSTANCES_CHARS:
        raise BadInput(f"{config.served_name}: param 'instances' must be a JSON text")
    try:
        tfserving.encode_preformatted(text)
    except ValueError as exc:
        raise BadInput(f"{config.served_name}: {exc}") from None
