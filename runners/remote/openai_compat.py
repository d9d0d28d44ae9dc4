"""Models served by any OpenAI-compatible HTTP server, as swarm runners.

One family for vLLM, llama.cpp's servers, Ollama and TGI (through their
OpenAI routes), OpenAI itself, and Hugging Face TEI (``api = "tei"``, see
``tei``). A server is declared by a config table; ``flavor`` is set only
where servers truly differ: ``vllm`` (LoRA adapter routes, ``/tokenize``,
``/health``) and ``llama-cpp-python`` (``/extras/tokenize/count``, its
``repeat_penalty`` name). Everything else is the OpenAI API.

Text generation (``task = "text-generation"``), inputs (exactly one):

- ``prompt``: a string, or a list of strings = a batch of prompts (each sent as
  its own ``/v1/completions`` call, concurrently, answered in order: servers
  such as llama-cpp-python take one prompt per call);
- ``messages``: one conversation for ``/v1/chat/completions``, as a JSON string
  of ``[{"role": "user", "content": "..."}, ...]``.

Outputs: ``text`` (str, or list[str] for a list of prompts), ``finish_reason``
(the same shape), ``prompt_tokens`` and ``completion_tokens`` (ints, summed
over a batch; absent when the server does not count). ``stream`` (one prompt
or conversation) yields ``{"text": delta}`` chunks, then a last chunk with
``text`` "" and ``finish_reason`` (and token counts when the server sent
them). Params: see ``openai_protocol.SAMPLING`` plus ``stop`` and ``adapter``
(a LoRA adapter or fine-tune to address instead of the base model). Without
``max_tokens`` a request gets the config's ``max_tokens``, at most half the
context length when that is known.

Embeddings (``task = "embeddings"``): input ``text`` (a string or a list),
output ``embedding`` float32 [n, dim] (and ``prompt_tokens`` when the server
counts them); param ``dimensions`` where the model supports it.

At ``load`` the runner lists the server's models, refuses to start if the
model is missing, and reads the context length where the server tells
(vLLM's ``max_model_len``, llama.cpp's ``meta.n_ctx_train``...). With a context
length known, a prompt that cannot fit is refused before it is sent (counted
by the server's tokenize route where the flavor has one); the server's own
400 for it is a ``BadInput`` too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import httpx
import numpy as np

from protocols import Param, Tensor, Value, bounded_json
from protocols.config import Table
from protocols.errors import ConfigError

from ..base import TEXT, ModelInfo, Outputs, OutputSpec, TextSpec, check_inputs, gather
from ..errors import BadInput, ModelNotFound, RunnerError
from .config import EndpointConfig
from .errors import BackendError, BackendFailed, BackendGarbage, BackendRejected
from .openai_protocol import (
    Completion,
    Sampling,
    SSEParser,
    parse_chunk,
    parse_completion,
    parse_embeddings,
    parse_messages,
    parse_params,
    usage,
)
from .openai_tools import ToolCallParts, tool_deltas
from .runner import RemoteRunner

APIS = ("openai", "tei")
RUNNER = "openai-compat"  # what models of this runner announce as their runner
TASKS = ("text-generation", "embeddings")
FLAVORS = ("generic", "vllm", "llama-cpp-python")
POOLINGS = ("none", "mean")
MESSAGE_OVERHEAD_TOKENS = 8  # a chat template's tokens around each message, at most, roughly
PROMPT_MARGIN_TOKENS = 16  # BOS/EOS and friends
MAX_DIMENSIONS = 65536
# Texts and reasons are lists for a list of prompts; counts and tool calls come only
# when the server sends them (see the module).
GENERATE_OUTPUTS = (
    OutputSpec("text", TEXT, (None,)),
    OutputSpec("finish_reason", TEXT, (None,)),
    OutputSpec("tool_calls", TEXT, (1,)),
    OutputSpec("prompt_tokens", "int64", (1,)),
    OutputSpec("completion_tokens", "int64", (1,)),
)
# Rows as wide as the model's, or as the param ``dimensions`` asks.
EMBED_OUTPUTS = (
    OutputSpec("embedding", "float32", (None, None)),
    OutputSpec("prompt_tokens", "int64", (1,)),
)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OpenAICompatConfig:
    """One model on one OpenAI-compatible (or TEI) server. See ``from_table`` for fields."""

    endpoint: EndpointConfig
    model: str  # the model's id on the server
    api: str = "openai"
    task: str = "text-generation"
    flavor: str = "generic"
    context_length: int | None = None  # when the server does not tell
    max_tokens: int = 256  # when a request does not say
    max_batch: int = 32
    max_chars: int = 1_000_000
    check_model: bool = True
    lora_adapters: tuple[tuple[str, str], ...] = ()  # (name, path), loaded at start (vllm)
    pooling: str = "none"  # "mean": average per-token embeddings a server may answer

    def __post_init__(self) -> None:
        if self.api not in APIS or self.task not in TASKS or self.flavor not in FLAVORS:
            raise ConfigError(
                f"api, task or flavor unknown: {self.api}, {self.task}, {self.flavor}"
            )
        if self.api == "tei" and self.task != "embeddings":
            raise ConfigError("task: the tei api serves embeddings only")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling: expected one of {list(POOLINGS)}")
        if self.lora_adapters and self.flavor != "vllm":
            raise ConfigError("lora_adapters: only the vllm flavor loads adapters")

    @property
    def name(self) -> str:
        return self.endpoint.name

    @classmethod
    def from_table(cls, table: Table) -> OpenAICompatConfig:
        """Read a model table; the caller calls ``table.done()`` afterwards.

        Fields: those of ``EndpointConfig.from_table`` (``name`` is the swarm
        model name, ``base_url`` the server root), and ``model`` (the server's
        id, default ``name``), ``api`` ("openai" | "tei"), ``task``
        ("text-generation" | "embeddings"; tei: embeddings), ``flavor``
        ("generic" | "vllm" | "llama-cpp-python"), ``context_length``,
        ``max_tokens``, ``max_batch``, ``max_chars``, ``check_model``,
        ``lora_adapters`` (["name=path", ...], vllm only), ``pooling`` ("none" |
        "mean": average the per-token vectors a server without pooling answers).
        """
        endpoint = EndpointConfig.from_table(table)
        api = table.text("api", "openai", choices=APIS)
        task = table.text(
            "task", "embeddings" if api == "tei" else "text-generation", choices=TASKS
        )
        adapters = []
        for item in table.texts("lora_adapters", ()):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(
                    f"{table.where}.lora_adapters: expected 'name=path', got {item!r}"
                )
            adapters.append((name, path))
        try:
            return cls(
                endpoint=endpoint,
                model=table.text("model", endpoint.name),
                api=api,
                task=task,
                flavor=table.text("flavor", "generic", choices=FLAVORS),
                context_length=table.integer("context_length", None, low=1, high=2**31 - 1),
                max_tokens=table.integer("max_tokens", 256, low=1, high=2**31 - 1),
                max_batch=table.integer("max_batch", 32, low=1, high=4096),
                max_chars=table.integer("max_chars", 1_000_000, low=1, high=2**31 - 1),
                check_model=table.flag("check_model", True),
                lora_adapters=tuple(adapters),
                pooling=table.text("pooling", "none", choices=POOLINGS),
            )
        except ConfigError as exc:
            raise ConfigError(f"{table.where}: {exc}") from None


def build_runner(
    config: OpenAICompatConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    environ: Mapping[str, str] | None = None,
) -> RemoteRunner[OpenAICompatConfig]:
    """An unloaded runner for ``config``; ``transport`` and ``environ`` as for
    ``RemoteRunner`` (tests)."""
    runner: type[RemoteRunner[OpenAICompatConfig]]
    if config.api == "tei":
        from .tei import TEIEmbedRunner

        runner = TEIEmbedRunner
    elif config.task == "embeddings":
        runner = OpenAIEmbedRunner
    else:
        runner = OpenAIGenerateRunner
    return runner(config, transport=transport, environ=environ)


def context_length_of(entry: Mapping[str, Any] | None) -> int | None:
    """The context length a models-list entry tells, under the names servers use."""
    if not entry:
        return None
    meta = entry.get("meta")
    candidates = [
        entry.get("max_model_len"),  # vLLM
        entry.get("context_length"),  # OpenRouter, Together and others
        entry.get("context_window"),
        entry.get("max_context_length"),  # LM Studio
        meta.get("n_ctx") if isinstance(meta, dict) else None,  # llama.cpp server
        meta.get("n_ctx_train") if isinstance(meta, dict) else None,
    ]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def openai_status(config: OpenAICompatConfig) -> dict[str, Any]:
    """The family's part of ``status``: the model as the server names it, api and flavor."""
    return {"model": config.model, "api": config.api, "flavor": config.flavor}


class _OpenAIRunner(RemoteRunner[OpenAICompatConfig]):
    """What both OpenAI tasks share: the models list and the 404-means-no-model rule."""

    def _status(self) -> dict[str, Any]:
        return openai_status(self.config)

    def _health_path(self) -> str:
        return "/health" if self.config.flavor == "vllm" else "/v1/models"

    async def list_models(self) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` entries (base models and, on vLLM, adapters)."""
        body = await self.endpoint.call_json("GET", "/v1/models", idempotent=True)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
        ):
            raise BackendGarbage(f"{self.info.name}: GET /v1/models: no list of models with ids")
        return data

    async def _find_model(self) -> dict[str, Any] | None:
        models = await self.list_models()
        entry = next((m for m in models if m["id"] == self.config.model), None)
        if entry is None and self.config.check_model:
            served = [m["id"] for m in models][:20]
            raise ModelNotFound(
                f"{self.info.name}: the server has no model {self.config.model!r}; "
                f"it serves {served}"
            )
        return entry

    async def _post(self, path: str, body: Mapping[str, Any], model: str) -> Any:
        try:
            return await self.endpoint.call_json("POST", path, body=body, idempotent=True)
        except BackendRejected as exc:
            raise missing_model(exc, model) from exc


def missing_model(exc: BackendRejected, model: str) -> BackendError:
    """A 404 from a model route means the model (or adapter) is not there."""
    if exc.status != 404:
        return exc
    from .errors import BackendModelMissing

    return BackendModelMissing(f"{exc} (model {model!r})", status=404)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A checked generation request."""

    prompts: list[str]  # empty for a conversation
    messages: list[dict[str, Any]] | None
    batch: bool
    sampling: Sampling


class OpenAIGenerateRunner(_OpenAIRunner):
    """Text generation over ``/v1/completions`` and ``/v1/chat/completions`` (see module)."""

    # LoRA adapters the server has, where the flavor tells (None: not known).
    adapters: frozenset[str] | None = None

    def _describe(self) -> ModelInfo:
        c = self.config
        inputs = (
            TextSpec("prompt", max_items=c.max_batch, max_chars=c.max_chars, required=False),
            TextSpec("messages", max_items=1, max_chars=c.max_chars, required=False),
        )
        extra = {"api": c.api, "flavor": c.flavor, "backend_model": c.model}
        return self._remote_info(
            "text-generation",
            RUNNER,
            inputs,
            GENERATE_OUTPUTS,
            extra,
            streams=True,
            context_length=c.context_length,
        )

    async def _discover(self) -> None:
        entry = await self._find_model()
        context = self.config.context_length or context_length_of(entry)
        self.info = replace(self.info, context_length=context)
        if self.config.flavor == "vllm":
            loaded = set(await self.list_adapters())
            for name, path in self.config.lora_adapters:
                if name not in loaded:
                    await self.load_adapter(name, path)

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self._plan(inputs, params)

    def _plan(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> _Plan:
        name = self.info.name
        check_inputs(self.info, inputs)
        prompt, messages = inputs.get("prompt"), inputs.get("messages")
        if (prompt is None) == (messages is None):
            raise BadInput(f"{name}: give exactly one of 'prompt' or 'messages'")
        context = self.info.context_length
        default_max_tokens = self.config.max_tokens
        if context is not None:  # a default must leave room for the prompt
            default_max_tokens = min(default_max_tokens, max(1, context // 2))
        sampling = parse_params(
            name, params, default_max_tokens=default_max_tokens, flavor=self.config.flavor
        )
        if context is not None and sampling.max_tokens >= context:
            raise BadInput(
                f"{name}: max_tokens {sampling.max_tokens} leaves no room for a prompt "
                f"in the context length {context}"
            )
        adapter = sampling.adapter
        if adapter is not None and self.adapters is not None and adapter not in self.adapters:
            raise ModelNotFound(f"{name}: no adapter {adapter!r} is loaded")
        if isinstance(messages, str):
            return _Plan([], parse_messages(name, messages), False, sampling)
        if isinstance(messages, list):
            raise BadInput(f"{name}: input 'messages' is one JSON string")
        if "tools" in sampling.fields:
            raise BadInput(f"{name}: tools go with 'messages' (chat), not with a prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list):  # check_inputs refused anything else already
            raise BadInput(f"{name}: input 'prompt' must be a string or a list of strings")
        return _Plan(prompts, None, isinstance(prompt, list), sampling)

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        plan = self._plan(inputs, params)
        if plan.messages is not None:
            return _outputs([await self._chat(plan.messages, plan.sampling)], batch=False)
        calls = [_bind(self._complete, p, plan.sampling) for p in plan.prompts]
        return _outputs(await gather(calls), batch=plan.batch)

    async def _complete(self, prompt: str, sampling: Sampling) -> Completion:
        await self._check_context(prompt, sampling, messages=0)
        model = sampling.adapter or self.config.model
        body = {"model": model, "prompt": prompt, **sampling.fields}
        answer = await self._post("/v1/completions", body, model)
        return parse_completion(f"{self.info.name}: /v1/completions", answer, chat=False)

    async def _chat(self, messages: list[dict[str, Any]], sampling: Sampling) -> Completion:
        await self._check_context(_joined(messages), sampling, messages=len(messages))
        model = sampling.adapter or self.config.model
        body = {"model": model, "messages": messages, **sampling.fields}
        answer = await self._post("/v1/chat/completions", body, model)
        return parse_completion(f"{self.info.name}: /v1/chat/completions", answer, chat=True)

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        plan = self._plan(inputs, params)
        if plan.batch:
            raise BadInput(f"{self.info.name}: stream takes one prompt or one conversation")
        sampling = plan.sampling
        model = sampling.adapter or self.config.model
        body: dict[str, Any] = {"model": model, **sampling.fields, "stream": True}
        if plan.messages is not None:
            chat, path = True, "/v1/chat/completions"
            await self._check_context(_joined(plan.messages), sampling, len(plan.messages))
            body["messages"] = plan.messages
        else:
            chat, path = False, "/v1/completions"
            await self._check_context(plan.prompts[0], sampling, messages=0)
            body["prompt"] = plan.prompts[0]
        where = f"{self.info.name}: {path}"
        last = Completion("", None, None, None)
        tool_calls = ToolCallParts()
        parser = SSEParser()
        done = False
        try:
            async with self.endpoint.stream_lines("POST", path, body=body) as lines:
                # Read to the end even after [DONE]: the server closes right after, and
                # an HTTP body left half-read is a connection thrown away.
                async for line in lines:
                    data = parser.feed(line)
                    if data is None or done:
                        continue
                    if data.strip() == "[DONE]":
                        done = True
                        continue
                    answer = _loads(where, data)
                    chunk = parse_chunk(where, answer, chat=chat)
                    tool_calls.feed(where, tool_deltas(answer))
                    last = _merge(last, chunk)
                    if chunk.text:
                        yield {"text": chunk.text}
        except BackendRejected as exc:
            raise missing_model(exc, model) from exc
        if not done and last.finish_reason is None:
            # Some servers (llama-cpp-python) answer 200 and then end the stream
            # empty when generation fails, e.g. for a prompt over the context.
            raise BackendFailed(f"{where}: the stream ended before the answer finished")
        yield _final(last, tool_calls.calls(where))

    async def _check_context(self, text: str, sampling: Sampling, messages: int) -> None:
        """Refuse a prompt that cannot fit in the context length, when that is known."""
        context = self.info.context_length
        if context is None:
            return
        overhead = PROMPT_MARGIN_TOKENS + MESSAGE_OVERHEAD_TOKENS * messages
        # Byte-level tokenizers never make more tokens than bytes: short prompts pass unasked.
        if len(text.encode()) + overhead + sampling.max_tokens <= context:
            return
        counted = await self._count_tokens(text)
        if counted is None:
            return  # no tokenize route: the server's own 400 will say
        if counted + overhead + sampling.max_tokens > context:
            raise BadInput(
                f"{self.info.name}: the prompt is {counted} tokens; with max_tokens "
                f"{sampling.max_tokens} it does not fit the context length {context}"
            )

    async def _count_tokens(self, text: str) -> int | None:
        flavor = self.config.flavor
        if flavor == "vllm":
            body: dict[str, Any] = {"model": self.config.model, "prompt": text}
            answer = await self.endpoint.call_json("POST", "/tokenize", body=body, idempotent=True)
        elif flavor == "llama-cpp-python":
            answer = await self.endpoint.call_json(
                "POST", "/extras/tokenize/count", body={"input": text}, idempotent=True
            )
        else:
            return None
        count = answer.get("count") if isinstance(answer, dict) else None
        if not isinstance(count, int):
            raise BackendGarbage(f"{self.info.name}: the tokenize answer has no count")
        return count

    # -- LoRA adapters (vLLM) ---------------------------------------------------------

    async def list_adapters(self) -> list[str]:
        """Adapters the server lists on top of the base model (vLLM shows them with a parent)."""
        self._need_flavor("vllm", "LoRA adapters")
        models = await self.list_models()
        names = [m["id"] for m in models if m.get("parent") == self.config.model]
        self.adapters = frozenset(names)
        return names

    async def load_adapter(self, name: str, path: str) -> None:
        """``POST /v1/load_lora_adapter``; the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
        self._need_flavor("vllm", "LoRA adapters")
        body = {"lora_name": name, "lora_path": path}
        await self.endpoint.call_raw("POST", "/v1/load_lora_adapter", body=body, idempotent=False)
        self.adapters = (self.adapters or frozenset()) | {name}

    async def unload_adapter(self, name: str) -> None:
        self._need_flavor("vllm", "LoRA adapters")
        body = {"lora_name": name}
        await self.endpoint.call_raw("POST", "/v1/unload_lora_adapter", body=body, idempotent=False)
        self.adapters = (self.adapters or frozenset()) - {name}

    def _need_flavor(self, flavor: str, what: str) -> None:
        if self.config.flavor != flavor:
            raise RunnerError(f"{self.info.name}: {what} need flavor {flavor!r}")


class OpenAIEmbedRunner(_OpenAIRunner):
    """Embeddings over ``/v1/embeddings``: ``text`` in, ``embedding`` float32 [n, dim] out."""

    def _describe(self) -> ModelInfo:
        c = self.config
        inputs = (TextSpec("text", max_items=c.max_batch, max_chars=c.max_chars),)
        extra = {"api": c.api, "flavor": c.flavor, "backend_model": c.model}
        return self._remote_info(
            "embeddings", RUNNER, inputs, EMBED_OUTPUTS, extra, context_length=c.context_length
        )

    async def _discover(self) -> None:
        entry = await self._find_model()
        context = self.config.context_length or context_length_of(entry)
        probe, _ = await self._embed(["probe"], None)
        extra = {**self.info.extra, "dim": int(probe.shape[1])}
        self.info = replace(self.info, context_length=context, extra=extra)

    def check(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> None:
        self._parse(inputs, params)

    def _parse(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> tuple[list[str], int | None]:
        name = self.info.name
        check_inputs(self.info, inputs)
        unknown = sorted(set(params) - {"dimensions"})
        if unknown:
            raise BadInput(f"{name}: unknown params {unknown}; it takes ['dimensions']")
        dimensions = params.get("dimensions")
        if dimensions is not None and (
            type(dimensions) is not int or not 1 <= dimensions <= MAX_DIMENSIONS
        ):
            raise BadInput(
                f"{name}: param 'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}"
            )
        text = inputs["text"]
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list):
            raise BadInput(f"{name}: input 'text' must be a string or a list of strings")
        return texts, dimensions

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        texts, dimensions = self._parse(inputs, params)
        rows, prompt_tokens = await self._embed(texts, dimensions)
        outputs: dict[str, Value] = {"embedding": Tensor.from_numpy(rows)}
        if prompt_tokens is not None:  # the server's count, for the gateway's usage
            outputs["prompt_tokens"] = prompt_tokens
        return outputs

    async def _embed(
        self, texts: list[str], dimensions: int | None
    ) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int | None]:
        """The rows, and the input tokens the server counted (None if it did not say)."""
        model = self.config.model
        body: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        answer = await self._post("/v1/embeddings", body, model)
        where = f"{self.info.name}: /v1/embeddings"
        rows = parse_embeddings(where, answer, len(texts), pool=self.config.pooling == "mean")
        return np.asarray(rows, dtype=np.float32), usage(answer)[0]


def _bind(
    fn: Callable[[str, Sampling], Awaitable[T]], prompt: str, s: Sampling
) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return await fn(prompt, s)

    return call


def _outputs(done: list[Completion], *, batch: bool) -> Outputs:
    texts = [c.text for c in done]
    reasons = [c.finish_reason or "unknown" for c in done]
    out: Outputs = {
        "text": texts if batch else texts[0],
        "finish_reason": reasons if batch else reasons[0],
    }
    if not batch and done[0].tool_calls:  # chat is never batched
        out["tool_calls"] = json.dumps(done[0].tool_calls)
    prompt_tokens = [c.prompt_tokens for c in done]
    completion_tokens = [c.completion_tokens for c in done]
    if all(n is not None for n in prompt_tokens):
        out["prompt_tokens"] = sum(n for n in prompt_tokens if n is not None)
    if all(n is not None for n in completion_tokens):
        out["completion_tokens"] = sum(n for n in completion_tokens if n is not None)
    return out


def _merge(last: Completion, chunk: Completion) -> Completion:
    return Completion(
        "",
        chunk.finish_reason or last.finish_reason,
        chunk.prompt_tokens if chunk.prompt_tokens is not None else last.prompt_tokens,
        chunk.completion_tokens if chunk.completion_tokens is not None else last.completion_tokens,
    )


def _final(last: Completion, tool_calls: list[dict[str, Any]]) -> Outputs:
    """The stream's last chunk: why it ended, token counts, and whole tool calls."""
    out: Outputs = {"text": "", "finish_reason": last.finish_reason or "unknown"}
    if tool_calls:
        out["tool_calls"] = json.dumps(tool_calls)
    if last.prompt_tokens is not None:
        out["prompt_tokens"] = last.prompt_tokens
    if last.completion_tokens is not None:
        out["completion_tokens"] = last.completion_tokens
    return out


def _joined(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m.get("content") or "" for m in messages)


def _loads(where: str, data: str) -> Any:
    try:
        return bounded_json.loads(data)
    except ValueError as exc:  # BadJSON too
        raise BackendGarbage(f"{where}: a stream event is not JSON: {exc}") from exc
