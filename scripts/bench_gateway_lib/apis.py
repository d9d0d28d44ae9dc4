"""What each of the gateway's other chat APIs adds over its OpenAI route, for the same job.

One caller, in rounds: each round asks the OpenAI route (``/v1/chat/completions``),
the Responses API, Anthropic's Messages and Ollama's chat for the same conversation,
not streamed, in an order that rotates every round (so none always goes first after
an idle moment). Every request becomes the same swarm job: the fake model takes the
conversation's JSON as its text, whatever API carried it. So an API's added latency
is its own parsing and answer shaping; the figure is the median of its differences
to the OpenAI request of the same round.

KServe v2 joins the rounds too, over REST (``/v2/models/{m}/infer``, a BYTES
tensor) and over gRPC (``tritonclient.grpc``, timed inside its worker thread so
the hop into it is not counted): the same model and one text of the same
length, not the chat's own text, so their answers are checked for being there,
not for being equal to the chat APIs'.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import httpx
import numpy as np
import trio

CONVERSATION = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "The quick brown fox jumps over the lazy dog."},
]
WARM = 20  # rounds first, not kept
TARGET_ADDED_MS = 0.5


def requests(model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each API's request for the one job, by the name the report prints."""
    return {
        "openai": ("/v1/chat/completions", {"model": model, "messages": CONVERSATION}),
        "responses": ("/v1/responses", {"model": model, "input": CONVERSATION}),
        "anthropic": (
            "/v1/messages",
            {
                "model": model,
                "max_tokens": 16,
                "system": CONVERSATION[0]["content"],
                "messages": CONVERSATION[1:],
            },
        ),
        "ollama": ("/api/chat", {"model": model, "messages": CONVERSATION, "stream": False}),
    }


def text_of(api: str, answer: Any) -> str:
    """The generated text, wherever each API puts it."""
    if api == "openai":
        return str(answer["choices"][0]["message"]["content"])
    if api == "responses":
        return str(answer["output"][0]["content"][0]["text"])
    if api == "anthropic":
        return str(answer["content"][0]["text"])
    return str(answer["message"]["content"])


def kserve_body(model: str) -> tuple[str, dict[str, Any]]:
    text = json.dumps(CONVERSATION)
    tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}
    return f"/v2/models/{model}/infer", {"inputs": [tensor]}


def grpc_call(address: str, model: str) -> Any:
    """A blocking call that times one gRPC infer on its own thread (client made once)."""
    import tritonclient.grpc as triton  # the test extra's; only this section needs it

    client = triton.InferenceServerClient(address)
    text = np.array([json.dumps(CONVERSATION).encode()], dtype=np.object_)
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(text)

    def once() -> float:
        t = time.perf_counter()
        answer = client.infer(model, [tensor])
        elapsed = time.perf_counter() - t
        if answer.as_numpy("embedding") is None:
            raise RuntimeError("the gRPC answer has no embedding")
        return elapsed

    return once


async def added_by_api(
    url: str, model: str, rounds: int, grpc: str | None = None
) -> dict[str, Any]:
    """Median latency per API, and the median of each API's differences to OpenAI's."""
    asked = requests(model)
    names = [*asked, "kserve"] + (["grpc"] if grpc else [])
    took: dict[str, list[float]] = {name: [] for name in names}
    rpc = grpc_call(grpc, model) if grpc else None
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def once(name: str) -> float:
            if name == "grpc":
                assert rpc is not None
                elapsed: float = await trio.to_thread.run_sync(rpc)
                return elapsed
            path, body = kserve_body(model) if name == "kserve" else asked[name]
            t = time.perf_counter()
            answer = await http.post(path, json=body)
            elapsed = time.perf_counter() - t
            answer.raise_for_status()
            if name == "kserve":
                if not answer.json().get("outputs"):
                    raise RuntimeError("the KServe v2 answer has no outputs")
            else:
                texts.setdefault(name, text_of(name, answer.json()))
            return elapsed

        texts: dict[str, str] = {}
        for i in range(WARM + rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            round_ = {name: await once(name) for name in order}
            if i >= WARM:
                for name in names:
                    took[name].append(round_[name])
    if len(set(texts.values())) != 1:
        raise RuntimeError(f"the APIs' answers differ, so their jobs did: {texts}")
    base = took["openai"]
    out: dict[str, Any] = {"rounds": rounds, "model": model, "target_ms": TARGET_ADDED_MS}
    for name in names:
        out[name] = {"median_ms": 1000 * statistics.median(took[name])}
        if name != "openai":
            paired = [a - b for a, b in zip(took[name], base, strict=True)]
            out[name]["added_ms"] = 1000 * statistics.median(paired)
    return out
