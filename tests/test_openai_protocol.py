"""The OpenAI wire format as pure functions: SSE framing, answers, embeddings, params."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runners.errors import BadInput
from runners.remote import openai_protocol
from runners.remote.errors import BackendFailed, BackendGarbage
from runners.remote.openai_protocol import (
    SSEParser,
    parse_chunk,
    parse_completion,
    parse_embeddings,
    parse_params,
)


def test_sse_events_follow_the_html_standard() -> None:
    parser = SSEParser()
    lines = [": ping", "event: message", "id: 7", 'data: {"a":', "data:1}", "", "", "data: [DONE]"]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == ['{"a":\n1}']
    assert parser.end() == "[DONE]"  # a last event without its blank line
    assert parser.end() is None


def test_completion_and_chat_answers() -> None:
    body = {
        "choices": [{"text": " Paris", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
    done = parse_completion("w", body, chat=False)
    assert (done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens) == (
        " Paris", "stop", 5, 1,
    )  # fmt: skip
    chat = parse_completion(
        "w", {"choices": [{"message": {"role": "assistant", "content": None}}]}, chat=True
    )
    assert chat.text == "" and chat.finish_reason is None and chat.prompt_tokens is None


@pytest.mark.parametrize(
    "body", [None, [], {"choices": []}, {"choices": [{"text": 3}]}, {"choices": ["x"]}]
)
def test_answers_without_choices_are_garbage(body: Any) -> None:
    with pytest.raises(BackendGarbage):
        parse_completion("w", body, chat=False)


def test_stream_chunks() -> None:
    role_only = parse_chunk("w", {"choices": [{"delta": {"role": "assistant"}}]}, chat=True)
    assert role_only.text == ""
    usage_only = parse_chunk(
        "w", {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}, chat=True
    )
    assert (usage_only.prompt_tokens, usage_only.completion_tokens) == (3, 9)
    with pytest.raises(BackendFailed, match="out of memory"):
        parse_chunk("w", {"error": {"message": "out of memory"}}, chat=False)


def test_embeddings_are_ordered_by_index_and_checked() -> None:
    body = {"data": [{"index": 1, "embedding": [3.0, 4.0]}, {"index": 0, "embedding": [1, 2]}]}
    assert parse_embeddings("w", body, 2, pool=False) == [[1, 2], [3.0, 4.0]]
    tokens = {"data": [{"index": 0, "embedding": [[1.0, 2.0], [3.0, 6.0]]}]}
    assert parse_embeddings("w", tokens, 1, pool=True) == [[2.0, 4.0]]
    with pytest.raises(BackendGarbage):
        parse_embeddings("w", tokens, 1, pool=False)  # token vectors, not asked to pool
    for bad in (
        {"data": [{"index": 0, "embedding": [1.0]}]},  # too few
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]},
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [2.0, 3.0]}]},
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": ["x"]}]},
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [float("nan")]}]},
    ):
        with pytest.raises(BackendGarbage):
            parse_embeddings("w", bad, 2, pool=False)


def test_params_pass_through_under_their_api_names() -> None:
    sampling = parse_params(
        "m",
        {"temperature": 0, "seed": 7, "stop": "\n", "repetition_penalty": 1.1, "adapter": "sql"},
        default_max_tokens=32,
        flavor="llama-cpp-python",
    )
    assert dict(sampling.fields) == {
        "temperature": 0.0,
        "seed": 7,
        "stop": ["\n"],
        "repeat_penalty": 1.1,
        "max_tokens": 32,
    }
    assert sampling.adapter == "sql" and sampling.max_tokens == 32
    generic = parse_params("m", {"repetition_penalty": 1.1}, default_max_tokens=1, flavor="vllm")
    assert "repetition_penalty" in generic.fields
    with pytest.raises(BadInput, match="'top_k' must be an integer from -1"):
        parse_params("m", {"top_k": -2}, default_max_tokens=1, flavor="generic")


def test_tool_turns_and_tool_calls_are_checked() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    assert openai_protocol.parse_messages("m", json.dumps(turns)) == turns
    for bad, words in (
        ([{"role": "user", "content": "x", "tool_calls": [call]}], "belong to an assistant"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}], "complete"),
        ([{"role": "tool", "content": "42"}], "tool_call_id"),
        ([{"role": "user", "content": "x", "tool_call_id": "c1"}], "belongs to a tool"),
    ):
        with pytest.raises(BadInput, match=words):
            openai_protocol.parse_messages("m", json.dumps(bad))
    answer = {
        "choices": [
            {"message": {"content": None, "tool_calls": [call]}, "finish_reason": "tool_calls"}
        ]
    }
    done = openai_protocol.parse_completion("w", answer, chat=True)
    assert done.text == "" and done.tool_calls == [call] and done.finish_reason == "tool_calls"
    broken = {"choices": [{"message": {"content": None, "tool_calls": [{"id": 1}]}}]}
    with pytest.raises(BackendGarbage, match="complete function call"):
        openai_protocol.parse_completion("w", broken, chat=True)
    sampling = openai_protocol.parse_params(
        "m",
        {
            "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
            "tool_choice": "required",
        },
        default_max_tokens=8,
        flavor="vllm",
    )
    assert (
        sampling.fields["tool_choice"] == "required"
        and sampling.fields["tools"][0]["type"] == "function"
    )
    with pytest.raises(BadInput, match="tool_choice"):
        openai_protocol.parse_params(
            "m", {"tool_choice": "auto"}, default_max_tokens=8, flavor="vllm"
        )
