"""Embeddings from Hugging Face Text Embeddings Inference (TEI), ``api = "tei"``.

TEI has OpenAI routes too, but its own are richer: ``GET /info`` tells the
model id, its kind, the longest input (tokens) and the largest batch a client
may send, and ``POST /embed`` takes ``normalize`` and ``truncate``. So ``load``
reads ``/info`` (refusing a server whose model is not an embedding model, or
not the one configured when ``model`` is given), then embeds a probe to learn
the width. Its statuses follow TEI's OpenAPI document: 413 (batch too large)
and 422 (input too long, tokenizer) are ``BadInput``; 424 (the model failed)
and 429 (overloaded) mean what they do for every backend.

Input ``text`` (a string or a list), output ``embedding`` float32 [n, dim];
params ``normalize`` (bool, default true) and ``truncate`` (bool, default false).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from protocols import Param, Tensor, Value

from ..base import ModelInfo, Outputs, OutputSpec, TextSpec, check_inputs
from ..errors import BadInput, ModelNotFound
from .errors import BackendGarbage
from .openai_compat import OpenAICompatConfig, openai_status
from .openai_protocol import check_matrix
from .runner import RemoteRunner

PARAMS = ("normalize", "truncate")


class TEIEmbedRunner(RemoteRunner[OpenAICompatConfig]):
    """A TEI server's embedding model (see the module)."""

    def _describe(self) -> ModelInfo:
        c = self.config
        inputs = (TextSpec("text", max_items=c.max_batch, max_chars=c.max_chars),)
        outputs = (OutputSpec("embedding", "float32", (None, None)),)  # dim: once asked
        extra = {"api": c.api, "backend_model": c.model}
        return self._remote_info(
            "embeddings", "tei", inputs, outputs, extra, context_length=c.context_length
        )

    def _status(self) -> dict[str, Any]:
        return openai_status(self.config)

    def _health_path(self) -> str:
        return "/health"

    async def _discover(self) -> None:
        name = self.config.name
        info = await self.endpoint.call_json("GET", "/info", idempotent=True)
        if not isinstance(info, dict) or not isinstance(info.get("model_id"), str):
            raise BackendGarbage(f"{name}: GET /info: no model_id")
        model_type = info.get("model_type")
        if not isinstance(model_type, dict) or "embedding" not in model_type:
            raise ModelNotFound(f"{name}: the TEI server's model is not an embedding model")
        model_id = info["model_id"]
        if self.config.check_model and self.config.model not in (name, model_id):
            raise ModelNotFound(
                f"{name}: the TEI server serves {model_id!r}, not {self.config.model!r}"
            )
        batch = _positive(info.get("max_client_batch_size"))
        max_batch = min(self.config.max_batch, batch or self.config.max_batch)
        context = self.config.context_length or _positive(info.get("max_input_length"))
        probe = await self._embed(["probe"], normalize=True, truncate=False)
        self.info = replace(
            self.info,
            max_batch=max_batch,
            inputs=(TextSpec("text", max_items=max_batch, max_chars=self.config.max_chars),),
            outputs=(OutputSpec("embedding", "float32", (None, int(probe.shape[1]))),),
            context_length=context,
            extra={**self.info.extra, "dim": int(probe.shape[1]), "backend_model": model_id},
        )

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self._parse(inputs, params)

    def _parse(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> tuple[list[str], bool, bool]:
        name = self.info.name
        check_inputs(self.info, inputs)
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise BadInput(f"{name}: unknown params {unknown}; it takes {list(PARAMS)}")
        normalize, truncate = params.get("normalize", True), params.get("truncate", False)
        if not isinstance(normalize, bool) or not isinstance(truncate, bool):
            raise BadInput(f"{name}: params 'normalize' and 'truncate' must be true or false")
        text = inputs["text"]
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list):
            raise BadInput(f"{name}: input 'text' must be a string or a list of strings")
        return texts, normalize, truncate

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        texts, normalize, truncate = self._parse(inputs, params)
        rows = await self._embed(texts, normalize=normalize, truncate=truncate)
        return {"embedding": Tensor.from_numpy(rows)}

    async def _embed(
        self, texts: list[str], *, normalize: bool, truncate: bool
    ) -> np.ndarray[Any, np.dtype[np.float32]]:
        body = {"inputs": texts, "normalize": normalize, "truncate": truncate}
        answer = await self.endpoint.call_json("POST", "/embed", body=body, idempotent=True)
        rows = check_matrix(f"{self.info.name}: /embed", answer, len(texts))
        return np.asarray(rows, dtype=np.float32)


def _positive(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else None
