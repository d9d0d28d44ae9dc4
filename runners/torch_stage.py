"""A pipeline stage: a contiguous range of SmolLM2-135M-Instruct's decoder layers on torch.

A model too big for one machine is split by layers: stage ``[a, b)`` holds
decoder layers ``a`` to ``b - 1``, the first stage (``a == 0``) also the token
embedding, the last (``b == NUM_LAYERS``) also the final norm and the LM head
(tied to the embedding in SmolLM2, so the last stage holds the embedding
matrix too). A stage reads only its own tensors from the GGUF: the reader maps
the file and dequantizes the tensors it is asked for, so a stage's memory
falls with its layer count (the whole model is never built, not even briefly).

One call is one round for one session::

    StageCall(session, start, data, want)

``data`` holds positions ``start .. start + n - 1``: token ids (int64,
``[1, n]``) on the first stage, hidden states (float32, ``[1, n, HIDDEN]``)
on the others. Float32 on the wire whatever the stage computes in: bf16 and
fp16 widen to float32 exactly, so nothing is lost between stages. ``start``
0 opens the session afresh (a replay after an eviction or a replacement sends
the whole history at once); any other ``start`` must equal the length of the
session's KV cache, or the call is refused with ``SessionEvicted`` before
anything runs, so a stage never computes on a cache that is not the one the
caller thinks it is.

What a stage answers (``want``):

- ``hidden``: float32 ``[1, n, HIDDEN]``, the input of the next stage.
- ``logits`` (last stage): float32 ``[1, VOCAB]`` for the last position, for
  sampling at the entry (its seeded generator and logits processors live there).
- ``token`` (last stage): the greedy token id, int64 ``[1]``. Under greedy
  decoding without a repetition penalty the argmax is all the entry needs, and
  8 bytes travel instead of the 196 KB of a logits row (49,152 float32) each
  token: the entry asks for it exactly then.

Sessions (their KV caches) are bounded by ``SessionLimits``: how many, how many
bytes in all, how long idle. A session that would pass the byte bound evicts
the least recently used others; a session that alone needs more than the bound
is refused (``SessionTooLarge``, BAD_REQUEST: a replay would not fit either).
An evicted or expired session's next call raises ``SessionEvicted``
(NOT_EXECUTED: nothing ran, a replay is safe), which the entry turns into a
rebuild.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import trio

from protocols import Param, Tensor, Value
from protocols.codes import ErrorCode
from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_smollm2 as recipe
from .base import ModelInfo, Outputs, OutputSpec, Runner, TensorSpec, run_blocking
from .errors import BadInput, RunnerError
from .gguf_index import GGUFIndex, read_index
from .torch_device import Resolved, TorchPlacement, build_on, release, resolve

MODEL_NAME = recipe.MODEL_NAME
TASK = "pipeline-stage"
NUM_LAYERS = 30  # SmolLM2-135M's decoder layers (the GGUF's llama.block_count)
HIDDEN = 576
VOCAB = 49152
WANTS = ("hidden", "logits", "token")
MAX_SESSION_ID = 64
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROWS = 2048  # rows dequantized at a time
_LAYERS = re.compile(r"(\d{1,3})-(\d{1,3})")
# GGUF tensor names of one llama block, and where each goes in a LlamaDecoderLayer.
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class SessionEvicted(RunnerError):
    """This stage holds no cache for the session at the position asked (evicted,
    expired, or never opened here). Nothing ran: replay the session from 0."""

    code = ErrorCode.NOT_EXECUTED


class SessionTooLarge(BadInput):
    """The session alone needs more cache than the stage may hold: no replay helps."""


@dataclass(frozen=True, slots=True)
class LayerRange:
    """Decoder layers ``start`` to ``stop - 1`` of a model of ``total`` layers."""

    start: int
    stop: int
    total: int = NUM_LAYERS

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.total:
            raise ConfigError(
                f"layers: {self.start}-{self.stop - 1} is not a range within 0-{self.total - 1}"
            )

    @classmethod
    def parse(cls, text: str, total: int = NUM_LAYERS) -> LayerRange:
        """``"A-B"``: layers A to B, both included (``0-9`` is the first ten)."""
        match = _LAYERS.fullmatch(text.strip())
        if match is None:
            raise ConfigError(f"layers: expected A-B (both included), got {text!r}")
        return cls(int(match[1]), int(match[2]) + 1, total)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.total

    @property
    def count(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.stop - 1}"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Bounds on the KV caches a stage keeps: sessions, bytes in all, idle seconds."""

    max_sessions: int = 16
    max_bytes: int = 512 * 2**20
    idle_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_sessions <= 4096:
            raise ConfigError("max_sessions must be from 1 to 4096")
        if not 2**16 <= self.max_bytes <= 2**40:
            raise ConfigError("max_session_bytes must be from 64 KiB to 1 TiB")
        if not 1.0 <= self.idle_s <= 86400.0:
            raise ConfigError("session_idle_s must be from 1 to 86400")


@dataclass(frozen=True, slots=True)
class TorchStageConfig:
    layers: LayerRange
    placement: TorchPlacement = field(default_factory=TorchPlacement)
    limits: SessionLimits = field(default_factory=SessionLimits)
    context_length: int = recipe.MODEL_CONTEXT

    def __post_init__(self) -> None:
        if not 2 <= self.context_length <= recipe.MODEL_CONTEXT:
            raise ConfigError(f"context_length must be from 2 to {recipe.MODEL_CONTEXT}")

    @property
    def name(self) -> str:
        """The model name the stage is served under (``catalog`` reads it)."""
        return stage_name(self.layers)

    @classmethod
    def from_table(cls, table: Table) -> TorchStageConfig:
        """Read ``layers`` (required, ``A-B``), ``device``, ``dtype``, ``context_length``,
        ``max_sessions``, ``max_session_bytes``, ``session_idle_s``. The caller calls
        ``table.done()``."""
        d = SessionLimits()
        try:
            layers = LayerRange.parse(str(table.text("layers")))
        except ConfigError as exc:
            raise ConfigError(f"{table.where}.{exc}") from None
        placement = TorchPlacement.from_table(table)
        context = table.integer("context_length", recipe.MODEL_CONTEXT, low=2, high=8192)
        limits = SessionLimits(
            table.integer("max_sessions", d.max_sessions, low=1, high=4096),
            table.integer("max_session_bytes", d.max_bytes, low=2**16, high=2**40),
            table.number("session_idle_s", d.idle_s, low=1.0, high=86400.0),
        )
        return cls(layers, placement, limits, context)


@dataclass(frozen=True, slots=True, eq=False)
class StageCall:
    """One round of one session through one stage (see the module)."""

    session: str
    start: int
    data: np.ndarray[Any, Any]
    want: str = "hidden"


@dataclass(slots=True)
class _Session:
    cache: Any  # a transformers DynamicCache over this stage's layers
    length: int
    nbytes: int
    used: float


class SessionStore:
    """The sessions of one stage, least recently used first. Not thread-safe: the
    stage calls it under its own lock."""

    def __init__(self, limits: SessionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    def expire(self) -> None:
        cutoff = self._clock() - self.limits.idle_s
        for key in [k for k, s in self._sessions.items() if s.used < cutoff]:
            del self._sessions[key]
            self.evictions += 1

    def take(self, session: str, start: int) -> _Session | None:
        """The session's state to extend from ``start``; None to open it afresh.
        Raises SessionEvicted when the stage's cache does not end at ``start``."""
        self.expire()
        if start == 0:
            self._sessions.pop(session, None)  # a replay replaces what was there
            return None
        held = self._sessions.get(session)
        if held is None or held.length != start:
            have = "no cache" if held is None else f"a cache of {held.length} positions"
            raise SessionEvicted(
                f"{MODEL_NAME} stage: session {session} has {have}, the call starts at {start}"
            )
        return held

    def make_room(self, session: str, need: int) -> None:
        """Evict least recently used others until ``need`` bytes for ``session`` fit."""
        if need > self.limits.max_bytes:
            raise SessionTooLarge(
                f"{MODEL_NAME} stage: the session needs {need} bytes of cache, "
                f"the stage holds at most {self.limits.max_bytes}"
            )
        others = [k for k in self._sessions if k != session]
        own = self._sessions[session].nbytes if session in self._sessions else 0
        total = self.nbytes - own
        count = len(others)
        for key in others:
            if total + need <= self.limits.max_bytes and count < self.limits.max_sessions:
                break
            total -= self._sessions.pop(key).nbytes
            count -= 1
            self.evictions += 1

    def put(self, session: str, state: _Session) -> None:
        state.used = self._clock()
        self._sessions[session] = state
        self._sessions.move_to_end(session)

    def drop(self, session: str) -> None:
        self._sessions.pop(session, None)


class StageEngine:
    """The layers, their sessions, and one forward at a time. Every method blocks."""

    def __init__(self, module: Any, config: TorchStageConfig, resolved: Resolved) -> None:
        import torch

        self._torch = torch
        self.module = module
        self.config = config
        self.resolved = resolved
        self.sessions = SessionStore(config.limits)
        self._lock = threading.Lock()
        cfg = module.config
        element = torch.finfo(resolved.dtype).bits // 8
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Keys and values of every layer here, for one position.
        self.bytes_per_position = 2 * config.layers.count * heads * head_dim * element
        self.weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    @classmethod
    def open(cls, config: TorchStageConfig) -> StageEngine:
        def build(resolved: Resolved) -> StageEngine:
            module = _build_stage(config.layers, resolved)
            return cls(module, config, resolved)

        return build_on(resolve(config.placement), build, f"{MODEL_NAME} layers {config.layers}")

    def forward(self, call: StageCall) -> np.ndarray[Any, Any]:
        """Run ``call``; answer as its ``want`` says (see the module)."""
        layers = self.config.layers
        n = _check_call(call, layers, self.config.context_length)
        torch = self._torch
        with self._lock, torch.inference_mode():
            held = self.sessions.take(call.session, call.start)
            length = call.start + n
            need = self.bytes_per_position * length
            self.sessions.make_room(call.session, need)
            cache = held.cache if held is not None else self.module.new_cache()
            try:
                out = self.module.run(call.data, call.start, cache, call.want)
            except BaseException:
                self.sessions.drop(call.session)  # a half-extended cache is no cache
                raise
            self.sessions.put(call.session, _Session(cache, length, need, 0.0))
            return np.asarray(out)

    def drop(self, session: str) -> None:
        with self._lock:
            self.sessions.drop(session)


def _check_call(call: StageCall, layers: LayerRange, context: int) -> int:
    if not _SESSION_ID.fullmatch(call.session):
        raise BadInput(f"{MODEL_NAME} stage: session must be 1 to 64 of [A-Za-z0-9_-]")
    if call.want not in WANTS:
        raise BadInput(f"{MODEL_NAME} stage: want must be one of {list(WANTS)}")
    if call.want != "hidden" and not layers.last:
        raise BadInput(f"{MODEL_NAME} stage {layers}: only the last stage answers {call.want}")
    data = call.data
    if layers.first:
        if data.dtype != np.int64 or data.ndim != 2 or data.shape[0] != 1:
            raise BadInput(f"{MODEL_NAME} stage {layers}: expects token ids, int64 [1, n]")
        if data.size and (int(data.min()) < 0 or int(data.max()) >= VOCAB):
            raise BadInput(f"{MODEL_NAME} stage {layers}: token ids must be in 0..{VOCAB - 1}")
    elif (
        data.dtype != np.float32 or data.ndim != 3 or data.shape[0] != 1 or data.shape[2] != HIDDEN
    ):
        raise BadInput(
            f"{MODEL_NAME} stage {layers}: expects hidden states, float32 [1, n, {HIDDEN}]"
        )
    n = int(data.shape[1])
    if n < 1:
        raise BadInput(f"{MODEL_NAME} stage {layers}: no positions to run")
    if not 0 <= call.start <= context - n:
        raise BadInput(
            f"{MODEL_NAME} stage {layers}: positions {call.start}..{call.start + n - 1} "
            f"pass the context of {context}"
        )
    if not layers.first and not np.isfinite(data).all():
        raise BadInput(f"{MODEL_NAME} stage {layers}: hidden states must be finite")
    return n


def _build_stage(layers: LayerRange, resolved: Resolved) -> Any:
    """The stage's module on ``resolved``, its weights read from the GGUF: only its own."""
    import torch
    from gguf import GGMLQuantizationType, dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    index = read_index(recipe.gguf_path())
    full = llama_config(index)
    if full.num_hidden_layers != layers.total:
        raise ModelShapeError(
            f"the GGUF has {full.num_hidden_layers} layers, the stage expects {layers.total}"
        )
    module = _stage_module(full, layers, resolved)
    # transformers' own undoing of llama.cpp's q/k row permutation, as from_pretrained does.
    processor = LlamaTensorProcessor(config=full.to_dict())  # type: ignore[no-untyped-call]
    params = dict(module.named_parameters())
    for gguf_name, target in _tensor_names(layers).items():
        info = index.tensors.get(gguf_name)
        if info is None:
            raise ModelShapeError(f"the GGUF lacks {gguf_name}")
        raw, param = index.raw(gguf_name), params[target]
        kind = GGMLQuantizationType(info.ggml_type)
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            # The permutation mixes rows: the tensor is dequantized whole (576 rows).
            weights = dequantize(raw, kind)
            weights = processor.process(weights=weights, name=gguf_name).weights  # type: ignore[no-untyped-call]
            _copy_rows(torch, param, 0, weights)
            continue
        # In slices of rows, so that dequantizing the 49,152-row embedding holds a few
        # MB at a time rather than several float32 copies of it (113 MB each).
        for row in range(0, raw.shape[0] if raw.ndim > 1 else 1, _ROWS):
            part = raw[row : row + _ROWS] if raw.ndim > 1 else raw
            _copy_rows(torch, param, row, dequantize(part, kind))
    return module.eval()


def _copy_rows(torch: Any, param: Any, row: int, weights: np.ndarray[Any, Any]) -> None:
    with torch.no_grad():
        if param.dim() == 1:
            param.copy_(torch.from_numpy(np.array(weights, dtype=np.float32)))
        else:
            block = torch.from_numpy(np.array(weights, dtype=np.float32))
            param[row : row + block.shape[0]].copy_(block)


def llama_config(index: GGUFIndex) -> Any:
    """The transformers LlamaConfig of a llama GGUF, from its metadata (as transformers'
    GGUF loader maps it: ``tests/test_torch_stage.py`` compares the two)."""
    from transformers import LlamaConfig

    meta = index.metadata
    if meta.get("general.architecture") != "llama":
        raise ModelShapeError(f"architecture {meta.get('general.architecture')!r}, not llama")

    def number(key: str) -> Any:
        value = meta.get(f"llama.{key}")
        if value is None:
            raise ModelShapeError(f"the GGUF lacks llama.{key}")
        return value

    heads = number("attention.head_count")
    hidden = number("embedding_length")
    return LlamaConfig(
        vocab_size=number("vocab_size"),
        hidden_size=hidden,
        intermediate_size=number("feed_forward_length"),
        num_hidden_layers=number("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=number("attention.head_count_kv"),
        max_position_embeddings=number("context_length"),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_theta": number("rope.freq_base"), "rope_type": "default"},
        head_dim=meta.get("llama.rope.dimension_count", hidden // heads),
        tie_word_embeddings="output.weight" not in index.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


class ModelShapeError(RunnerError):
    """The GGUF is not the SmolLM2 this stage was written for."""


def _tensor_names(layers: LayerRange) -> dict[str, str]:
    """GGUF tensor name -> this stage's parameter name."""
    names = {}
    for local, block in enumerate(range(layers.start, layers.stop)):
        for gguf, hf in _BLOCK_TENSORS.items():
            names[f"blk.{block}.{gguf}.weight"] = f"layers.{local}.{hf}.weight"
    if layers.first or layers.last:
        names["token_embd.weight"] = "embed.weight"  # the tied LM head on the last stage
    if layers.last:
        names["output_norm.weight"] = "norm.weight"
    return names


def _stage_module(full: Any, layers: LayerRange, resolved: Resolved) -> Any:
    """Build the stage's torch module (its class is made here: torch is imported late)."""
    import copy

    import torch
    from torch import nn
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )

    config = copy.deepcopy(full)
    config.num_hidden_layers = layers.count
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[layers.start : layers.stop]
    # What from_pretrained picks here; the masks and kernels must be the reference's.
    config._attn_implementation = "sdpa"
    device, dtype = resolved.device, resolved.dtype

    class Stage(nn.Module):
        embed: Any
        norm: Any
        rotary: Any

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            with torch.device("meta"):
                self.layers = nn.ModuleList(
                    LlamaDecoderLayer(config, layer_idx=i) for i in range(layers.count)
                )
                ends = layers.first or layers.last
                self.embed = (
                    nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
                    if ends
                    else None
                )
                self.norm = (
                    LlamaRMSNorm(config.hidden_size, config.rms_norm_eps) if layers.last else None
                )

        def new_cache(self) -> Any:
            return DynamicCache(config=config)

        def run(self, data: np.ndarray[Any, Any], start: int, cache: Any, want: str) -> Any:
            n = data.shape[1]
            if layers.first:
                hidden = self.embed(torch.tensor(data, device=device))
            else:
                # A copy: the wire's buffers are read-only.
                hidden = torch.tensor(data, device=device).to(dtype)
            positions = torch.arange(start, start + n, device=device).unsqueeze(0)
            mask = create_causal_mask(
                config=config,
                inputs_embeds=hidden,
                attention_mask=None,
                past_key_values=cache,
                position_ids=positions,
            )
            rotary = self.rotary(hidden, position_ids=positions)
            for layer in self.layers:
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=rotary,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
            if want == "hidden":
                return hidden.float().cpu().numpy()
            # The norm works position by position; the head needs only the last one.
            logits = nn.functional.linear(self.norm(hidden)[:, -1, :], self.embed.weight)
            if want == "token":
                return logits.argmax(dim=-1).cpu().numpy().astype(np.int64)
            return logits.float().cpu().numpy()

    module = Stage()
    module.to_empty(device=device)
    module.to(dtype)
    # Buffers made on the meta device hold nothing: the rotary tables are computed here.
    module.rotary = LlamaRotaryEmbedding(config=config).to(device)
    return module


class TorchStageRunner(Runner):
    """A stage as a node runner: ``tokens`` or ``hidden`` in, with params ``session``,
    ``start`` and ``want``; ``hidden``, ``logits`` or ``token`` out (see the module)."""

    def __init__(self, config: TorchStageConfig) -> None:
        self.config = config
        layers = config.layers
        first = TensorSpec("tokens", frozenset({"int64"}), (1, None))
        rest = TensorSpec("hidden", frozenset({"float32"}), (1, None, HIDDEN))
        outputs = [OutputSpec("hidden", "float32", (1, None, HIDDEN))]
        if layers.last:
            outputs += [
                OutputSpec("logits", "float32", (1, VOCAB)),
                OutputSpec("token", "int64", (1,)),
            ]
        self.info = ModelInfo(
            name=stage_name(layers),
            task=TASK,
            runner="torch",
            device=config.placement.device,
            precision=config.placement.dtype,
            max_batch=1,
            inputs=(first if layers.first else rest,),
            outputs=tuple(outputs),
            context_length=config.context_length,
            extra={
                "stage_of": MODEL_NAME,
                "layer_start": layers.start,
                "layer_stop": layers.stop,
                "layers_total": layers.total,
                "max_sessions": config.limits.max_sessions,
                "max_session_bytes": config.limits.max_bytes,
            },
        )
        self._limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()
        self._engine: StageEngine | None = None

    @property
    def engine(self) -> StageEngine | None:
        return self._engine

    async def load(self) -> None:
        async with self._load_lock:
            if self._engine is not None:
                return
            engine = await run_blocking(StageEngine.open, self.config, limiter=self._limiter)
            where = engine.resolved
            self.info = replace(
                self.info,
                device=where.device_name,
                precision=where.precision,
                extra={**self.info.extra, "weight_bytes": engine.weight_bytes},
            )
            self._engine = engine

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        call_from(self.config.layers, inputs, params)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        call = call_from(self.config.layers, inputs, params)
        engine = self._engine
        if engine is None:
            raise RunnerError(f"{self.info.name}: not loaded")
        try:
            out = await run_blocking(engine.forward, call, limiter=self._limiter)
        except RunnerError:
            raise
        except Exception as exc:
            raise RunnerError(f"{self.info.name}: the stage failed: {exc}") from exc
        return {call.want: Tensor.from_numpy(out)}

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(release, engine.resolved)

    def status(self) -> Mapping[str, Any] | None:
        engine = self._engine
        if engine is None:
            return None
        store = engine.sessions
        return {"sessions": len(store), "cache_bytes": store.nbytes, "evictions": store.evictions}


def stage_name(layers: LayerRange) -> str:
    """The name a stage is served under: the model and its layers, ``model@layers=A-B``."""
    return f"{MODEL_NAME}@layers={layers}"


def call_from(
    layers: LayerRange, inputs: Mapping[str, Value], params: Mapping[str, Param]
) -> StageCall:
    """A StageCall from a runner request; BadInput naming what is wrong."""
    name = "tokens" if layers.first else "hidden"
    unknown = set(inputs) - {name}
    if unknown:
        raise BadInput(
            f"{MODEL_NAME} stage {layers}: unknown inputs {sorted(unknown)}; it takes {name!r}"
        )
    value = inputs.get(name)
    if not isinstance(value, Tensor):
        raise BadInput(f"{MODEL_NAME} stage {layers}: input {name!r} must be a tensor")
    extra = set(params) - {"session", "start", "want"}
    if extra:
        raise BadInput(f"{MODEL_NAME} stage {layers}: unknown params {sorted(extra)}")
    session, start, want = params.get("session"), params.get("start"), params.get("want", "hidden")
    if not isinstance(session, str):
        raise BadInput(f"{MODEL_NAME} stage {layers}: param 'session' must be a string")
    if type(start) is not int:
        raise BadInput(f"{MODEL_NAME} stage {layers}: param 'start' must be an int")
    if not isinstance(want, str):
        raise BadInput(f"{MODEL_NAME} stage {layers}: param 'want' must be a string")
    call = StageCall(session, start, value.numpy(), want)
    _check_call(call, layers, recipe.MODEL_CONTEXT)
    return call
