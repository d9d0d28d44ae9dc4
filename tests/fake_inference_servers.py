"""FakeVLLM and FakeTEI: the routes no stand-in server here has, written from upstream docs.

llama-cpp-python stands in for every OpenAI-compatible server, but it has no
LoRA adapter routes, no ``/tokenize`` or ``/health``, and does not tell its
context length; real vLLM and TEI do not run here (CUDA builds, containers).
These fakes answer those routes as documented, over real HTTP (FakeBackend):

- FakeVLLM, from vLLM's OpenAI server (``vllm/entrypoints/openai/serving_models.py``
  and the LoRA docs): ``/v1/models`` lists the base model with
  ``max_model_len`` and each adapter with ``parent`` = the base model;
  ``POST /v1/load_lora_adapter`` {lora_name, lora_path} answers plain text
  "Success: ..." or an error (400 already loaded, 404 no adapter at the path);
  ``POST /v1/unload_lora_adapter`` {lora_name} (404 when unknown); a model
  that is neither base nor adapter is a 404 "The model `x` does not exist.";
  ``/tokenize`` {model, prompt} -> {count, max_model_len, tokens}; ``/health``.
  Its "tokenizer" is one token per whitespace-separated word, and its
  completion text names the model that answered, so tests see adapter routing.
  ``POST /v1/chat/completions`` follows OpenAI's function-calling guide: with
  ``tools`` and a last turn that is not a tool's, it calls the first tool with
  ``{"q": <the last user text>}`` (finish_reason ``tool_calls``); after a
  ``tool`` turn it answers "the tool said: <its content>". Streamed, a call
  comes in fragments (id and name first, then the arguments in two pieces).
- FakeTEI, from TEI's OpenAPI document (docs/openapi.json): ``GET /info``,
  ``POST /embed`` {inputs, normalize, truncate} -> [[float]], 413 for a batch
  over ``max_client_batch_size`` or an input over ``max_input_length`` tokens
  (words here) unless truncated, ``/health``. Its vectors are a hash of the text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from fake_backend import FakeBackend, Reply, Seen


def _sse(head: dict[str, object], deltas: list[dict[str, object]], finish: str) -> Reply:
    """A chat completion streamed as Server-Sent Events, one delta per chunk."""
    chunks = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
    chunks.append({"index": 0, "delta": {}, "finish_reason": finish})
    lines = [
        f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [c]})}\n"
        for c in chunks
    ]
    return Reply(200, kind="stream", lines=(*lines, "data: [DONE]\n"))


def _vllm_error(status: int, kind: str, message: str) -> Reply:
    return Reply(status, {"object": "error", "message": message, "type": kind, "code": status})


class FakeVLLM(FakeBackend):
    """A vLLM OpenAI server's model, adapter, tokenize and health routes (see module)."""

    def __init__(self, model: str = "base-model", max_model_len: int = 64) -> None:
        super().__init__()
        self.model = model
        self.max_model_len = max_model_len
        self.adapters: dict[str, str] = {}
        self.route("GET", "/v1/models", self._models)
        self.route("POST", "/v1/load_lora_adapter", self._load)
        self.route("POST", "/v1/unload_lora_adapter", self._unload)
        self.route("POST", "/v1/completions", self._complete)
        self.route("POST", "/v1/chat/completions", self._chat)
        self.route("POST", "/tokenize", self._tokenize)
        self.route("GET", "/health", lambda seen: Reply(200, b""))

    def _models(self, seen: Seen) -> Reply:
        base = {
            "id": self.model,
            "object": "model",
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        loras = [
            {"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": self.model}
            for name, path in self.adapters.items()
        ]
        return Reply(200, {"object": "list", "data": [base, *loras]})

    def _load(self, seen: Seen) -> Reply:
        body = seen.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _vllm_error(
                400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."
            )
        if name in self.adapters:
            return _vllm_error(
                400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded."
            )
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            return _vllm_error(404, "NotFoundError", f"No adapter found for {path}")
        self.adapters[name] = path
        return Reply(200, f"Success: LoRA adapter '{name}' added successfully.".encode())

    def _unload(self, seen: Seen) -> Reply:
        name = seen.json().get("lora_name")
        if name not in self.adapters:
            return _vllm_error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        del self.adapters[name]
        return Reply(200, f"Success: LoRA adapter '{name}' removed successfully.".encode())

    def _complete(self, seen: Seen) -> Reply:
        body = seen.json()
        model = body.get("model")
        if model != self.model and model not in self.adapters:
            return _vllm_error(404, "NotFoundError", f"The model `{model}` does not exist.")
        words = len(str(body.get("prompt", "")).split())
        text = f" answered by {model}"
        return Reply(
            200,
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": words,
                    "completion_tokens": 3,
                    "total_tokens": words + 3,
                },
            },
        )

    def _chat(self, seen: Seen) -> Reply:
        body = seen.json()
        messages, tools = body.get("messages") or [{}], body.get("tools")
        last = messages[-1]
        head = {"id": "chatcmpl-fake", "model": body.get("model"), "created": 0}
        if tools and last.get("role") != "tool":
            name = tools[0]["function"]["name"]
            arguments = json.dumps({"q": last.get("content")})
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            if not body.get("stream"):
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
                choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
                return Reply(200, {**head, "object": "chat.completion", "choices": [choice]})
            half = len(arguments) // 2
            fragments = [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": name}},
                {"index": 0, "function": {"arguments": arguments[:half]}},
                {"index": 0, "function": {"arguments": arguments[half:]}},
            ]
            deltas = [{"tool_calls": [f]} for f in fragments]
            return _sse(head, deltas, "tool_calls")
        text = f"the tool said: {last.get('content')}" if last.get("role") == "tool" else "hi"
        if body.get("stream"):
            return _sse(head, [{"role": "assistant", "content": text}], "stop")
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        return Reply(200, {**head, "object": "chat.completion", "choices": [choice]})

    def _tokenize(self, seen: Seen) -> Reply:
        words = str(seen.json().get("prompt", "")).split()
        tokens = list(range(len(words)))
        return Reply(
            200, {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}
        )


def tei_vector(text: str, dim: int) -> list[float]:
    """FakeTEI's embedding of ``text`` before normalizing."""
    digest = hashlib.shake_256(text.encode()).digest(dim)
    return [b / 255.0 - 0.5 for b in digest]


class FakeTEI(FakeBackend):
    """A TEI server's ``/info``, ``/embed`` and ``/health`` (see module)."""

    def __init__(
        self,
        model_id: str = "BAAI/bge-small-en-v1.5",
        *,
        dim: int = 8,
        max_batch: int = 4,
        max_input_length: int = 16,
        model_type: str = "embedding",
    ) -> None:
        super().__init__()
        self.model_id = model_id
        self.dim = dim
        self.max_batch = max_batch
        self.max_input_length = max_input_length
        self.model_type = model_type
        self.route("GET", "/info", self._info)
        self.route("POST", "/embed", self._embed)
        self.route("GET", "/health", lambda seen: Reply(200, b""))

    def _info(self, seen: Seen) -> Reply:
        return Reply(
            200,
            {
                "model_id": self.model_id,
                "model_sha": None,
                "model_dtype": "float32",
                "model_type": {self.model_type: {"pooling": "cls"}},
                "max_concurrent_requests": 512,
                "max_input_length": self.max_input_length,
                "max_batch_tokens": 16384,
                "max_batch_requests": None,
                "max_client_batch_size": self.max_batch,
                "auto_truncate": False,
                "tokenization_workers": 2,
                "version": "1.7.1",
            },
        )

    def _embed(self, seen: Seen) -> Reply:
        body = seen.json()
        inputs = body["inputs"]
        texts = [inputs] if isinstance(inputs, str) else inputs
        if len(texts) > self.max_batch:
            message = f"batch size {len(texts)} > maximum allowed batch size {self.max_batch}"
            return Reply(413, {"error": message, "error_type": "validation"})
        rows = []
        for text in texts:
            words = text.split()
            if len(words) > self.max_input_length:
                if not body.get("truncate", False):
                    message = (
                        f"Input validation error: `inputs` must have less than "
                        f"{self.max_input_length} tokens. Given: {len(words)}"
                    )
                    return Reply(413, {"error": message, "error_type": "validation"})
                text = " ".join(words[: self.max_input_length])
            row = tei_vector(text, self.dim)
            if body.get("normalize", True):
                norm = math.sqrt(sum(v * v for v in row))
                row = [v / norm for v in row]
            rows.append(row)
        return Reply(200, rows)
