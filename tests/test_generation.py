"""Text-generation requests and the thread-to-trio token bridge, without a model.

The bridge runs real threads: a worker that emits as fast as it can must be
held back by a slow reader (bounded buffer), and a reader that leaves must
stop the worker before ``pieces`` returns.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import aclosing

import pytest
import trio
from support import undeclared

from protocols import ErrorCode, Param, Value
from runners.base import ModelInfo
from runners.continuation import Continuation
from runners.errors import BadInput
from runners.generation import (
    MAX_CHARS,
    MAX_SEED,
    OUTPUTS,
    Completion,
    Message,
    Piece,
    Shown,
    StopScanner,
    TokenText,
    input_specs,
    parse_request,
)
from runners.token_stream import Done, Emit, pieces, run_cancellable

INFO = ModelInfo(
    name="m",
    task="text-generation",
    runner="test",
    device="cpu",
    precision="fp32",
    max_batch=1,
    inputs=input_specs(),
    outputs=OUTPUTS,
)
LIMIT = 100
CHAT = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


def test_prompt_and_defaults() -> None:
    request = parse_request(INFO, {"prompt": "Once upon"}, {}, LIMIT)
    assert request.prompt.text == "Once upon" and request.prompt.messages == ()
    sampling = request.sampling
    assert sampling.greedy and sampling.max_new_tokens == LIMIT and sampling.seed is None


def test_messages_and_every_param() -> None:
    params: dict[str, Param] = {
        "max_new_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": MAX_SEED,
        "stop": ["\n", "END"],
        "repetition_penalty": 1.1,
    }
    request = parse_request(INFO, {"messages": CHAT}, params, LIMIT)
    assert request.prompt.messages == (Message("system", "Be brief."), Message("user", "Hi"))
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (7, 0.7, 0.9, 40)
    assert s.seed == MAX_SEED
    assert s.stop == ("\n", "END") and s.repetition_penalty == 1.1 and not s.greedy
    assert parse_request(INFO, {"prompt": "x"}, {"stop": "."}, LIMIT).sampling.stop == (".",)


BAD: dict[str, tuple[dict[str, Value], dict[str, Param], str]] = {
    "neither input": ({}, {}, "exactly one"),
    "both inputs": ({"prompt": "a", "messages": CHAT}, {}, "exactly one"),
    "empty prompt": ({"prompt": ""}, {}, "empty"),
    "two prompts": ({"prompt": ["a", "b"]}, {}, "1 to 1"),
    "prompt too long": ({"prompt": "a" * (MAX_CHARS + 1)}, {}, "at most"),
    "messages not json": ({"messages": "[{"}, {}, "not JSON"),
    "messages too deep": ({"messages": "[" * 50_000}, {}, "nested deeper than"),
    "messages not a list": ({"messages": '{"role": "user"}'}, {}, "JSON list"),
    "no messages": ({"messages": "[]"}, {}, "JSON list"),
    "bad role": ({"messages": '[{"role": "tool", "content": "x"}]'}, {}, r"messages\[0\]"),
    "extra key": (
        {"messages": '[{"role": "user", "content": "x", "name": "n"}]'},
        {},
        r"messages\[0\]",
    ),
    "content not text": ({"messages": '[{"role": "user", "content": 3}]'}, {}, "messages"),
    "unknown param": ({"prompt": "a"}, {"beams": 2}, "unknown params"),
    "zero tokens": ({"prompt": "a"}, {"max_new_tokens": 0}, "max_new_tokens"),
    "over the limit": ({"prompt": "a"}, {"max_new_tokens": LIMIT + 1}, "max_new_tokens"),
    "float tokens": ({"prompt": "a"}, {"max_new_tokens": 5.0}, "max_new_tokens"),
    "bool tokens": ({"prompt": "a"}, {"max_new_tokens": True}, "max_new_tokens"),
    "negative temperature": ({"prompt": "a"}, {"temperature": -0.1}, "temperature"),
    "hot temperature": ({"prompt": "a"}, {"temperature": 2.5}, "temperature"),
    "text temperature": ({"prompt": "a"}, {"temperature": "hot"}, "temperature"),
    "top_p zero": ({"prompt": "a"}, {"top_p": 0.0}, r"top_p.*\(0, 1\]"),
    "top_p over one": ({"prompt": "a"}, {"top_p": 1.5}, "top_p"),
    "negative top_k": ({"prompt": "a"}, {"top_k": -1}, "top_k"),
    "negative seed": ({"prompt": "a"}, {"seed": -1}, "seed"),
    "empty stop": ({"prompt": "a"}, {"stop": ""}, "stop"),
    "too many stops": ({"prompt": "a"}, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "long stop": ({"prompt": "a"}, {"stop": "x" * 65}, "stop"),
    "penalty zero": ({"prompt": "a"}, {"repetition_penalty": 0.0}, "repetition_penalty"),
    "prefix alone": ({"prompt": "a"}, {"continue_from": "b"}, "continue_tokens"),
    "tokens alone": ({"prompt": "a"}, {"continue_tokens": 2}, "continue_from"),
    "empty prefix": ({"prompt": "a"}, {"continue_from": "", "continue_tokens": 0}, "1 to"),
    "prefix too long": (
        {"prompt": "a"},
        {"continue_from": "b" * (MAX_CHARS + 1), "continue_tokens": 1},
        "continue_from",
    ),
    "negative tokens": (
        {"prompt": "a"},
        {"continue_from": "b", "continue_tokens": -1},
        "continue_tokens",
    ),
    "text tokens": ({"prompt": "a"}, {"continue_from": "b", "continue_tokens": "1"}, "int"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_refused(case: str) -> None:
    inputs, params, message = BAD[case]
    with pytest.raises(BadInput, match=message) as info:
        parse_request(INFO, inputs, params, LIMIT)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_the_answer_is_the_declared_outputs() -> None:
    """What infer and a stream's last chunk carry (Completion.outputs), as declared."""
    answer = Completion("Paris.", prompt_tokens=12, completion_tokens=3, finish_reason="stop")
    assert undeclared(INFO, answer.outputs()) == []
    assert {o.name for o in OUTPUTS} - {"tokens"} == set(answer.outputs())  # tokens: chunks'
    assert undeclared(INFO, {"text": "Par", "tokens": 1}) == []


def test_a_continuation_keeps_the_clients_budget() -> None:
    """continue_from/continue_tokens: the budget is the request's less what was spent,
    capped by the context; a spent budget answers "length" with nothing more."""
    params: dict[str, Param] = {"max_new_tokens": 10, "continue_from": "Par", "continue_tokens": 4}
    request = parse_request(INFO, {"messages": CHAT}, params, LIMIT)
    assert request.continuation == Continuation("Par", 4) and request.spent == 4
    assert request.sampling.max_new_tokens == 10  # the whole answer's limit, as asked
    assert request.input_text("<rendered>") == "<rendered>Par"
    assert request.budget("m", input_tokens=20, context_length=100) == 6
    assert request.budget("m", input_tokens=97, context_length=100) == 3  # the context's end
    assert request.budget("m", input_tokens=100, context_length=100) == 0  # no error: "length"
    spent = parse_request(INFO, {"prompt": "a"}, {**params, "continue_tokens": 10}, LIMIT)
    assert spent.budget("m", 5, 100) == 0
    assert spent.spent_answer(5) == Completion("", 5, 10, "length")
    # Without a continuation a prompt that fills the context is the client's error.
    plain = parse_request(INFO, {"prompt": "a"}, {"max_new_tokens": 10}, LIMIT)
    assert plain.spent == 0 and plain.input_text("a") == "a"
    with pytest.raises(BadInput, match="context holds"):
        plain.budget("m", 100, 100)


def _decoder(vocab: dict[int, bytes], delay: int = 0) -> TokenText:
    """A byte-level detokenizer over ``vocab`` (special ids decode to nothing)."""
    return TokenText(lambda ids: b"".join(vocab[i] for i in ids).decode(errors="replace"), delay)


def _feed(text: TokenText, ids: list[int]) -> list[Piece]:
    found = [text.add(i) for i in ids]
    return [p for p in (*found, text.flush()) if p is not None]


def test_token_text_counts_the_tokens_of_each_piece() -> None:
    euro = "€".encode()  # three bytes: split over two tokens, its text waits for both
    vocab = {1: b"Hi", 2: b" there", 3: euro[:2], 4: euro[2:], 5: b"!\n", 6: b"ok", 0: b""}
    got = _feed(_decoder(vocab), [1, 2, 3, 4, 5, 6, 0])
    assert got == [Piece("Hi", 1), Piece(" there", 1), Piece("€", 2), Piece("!\n", 1),
                   Piece("ok", 1)]  # fmt: skip
    assert sum(p.tokens for p in got) == 6  # the end-of-turn id (0) adds no text: not counted
    delayed = _feed(_decoder(vocab, delay=2), [1, 2, 3, 4, 6, 6])
    assert "".join(p.text for p in delayed) == "Hi there€okok"
    # Shown once two more tokens came (and not while the newest ends mid-character).
    assert delayed[0] == Piece("Hi there", 2)
    assert sum(p.tokens for p in delayed) == 6


def test_shown_counts_only_the_tokens_of_text_let_through() -> None:
    shown, scanner = Shown(), StopScanner(("END",))
    out = []
    for piece in (Piece("one ", 1), Piece("E", 1), Piece("N", 1), Piece("VOY", 2)):
        shown.decoded(piece)
        if text := scanner.feed(piece.text):
            out.append(shown.show(text))
    # "E" and "N" were held back (they may start END): counted with the text that freed them
    assert out == [Piece("one ", 1), Piece("ENVOY", 4)]


@pytest.mark.parametrize(
    ("pieces_in", "stops", "shown", "stopped"),
    [
        (["Hello", " wor", "ld"], (), "Hello world", False),
        (["a, b", ", c", "; d"], (";",), "a, b, c", True),
        (["one EN", "D two"], ("END",), "one ", True),  # the stop string spans two pieces
        (["one EN", "VOY"], ("END",), "one ENVOY", False),  # held back, then released
        (["x <", "|im_"], ("<|im_end|>",), "x <|im_", False),  # never completed: flushed
        (["ab", "c"], ("bc", "abcd"), "a", True),  # the earliest stop wins
    ],
)
def test_stop_scanner(
    pieces_in: list[str], stops: tuple[str, ...], shown: str, stopped: bool
) -> None:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(p) for p in pieces_in) + scanner.flush()
    assert (out, scanner.stopped) == (shown, stopped)


def test_stop_scanner_holds_back_only_a_possible_start() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed("the E") == "the "
    assert scanner.feed("x") == "Ex"


async def test_pieces_then_done() -> None:
    def work(emit: Emit) -> int:
        for word in ("a", "b", "c"):
            emit(word)
        return 42

    got = [item async for item in pieces(work, buffer=2)]
    assert got == ["a", "b", "c", Done(42)]


async def test_worker_errors_reach_the_reader_after_its_pieces() -> None:
    def work(emit: Emit) -> int:
        emit("first")
        raise BadInput("too long")

    got: list[object] = []
    with pytest.raises(BadInput, match="too long"):
        async for item in pieces(work, buffer=4):
            got.append(item)
    assert got == ["first"]


async def test_a_slow_reader_holds_the_worker_back() -> None:
    buffer = 3
    emitted = 0
    most_ahead = 0
    read = 0

    def work(emit: Emit) -> None:
        nonlocal emitted
        for i in range(30):
            if not emit(str(i)):
                return
            emitted += 1

    async with aclosing(pieces(work, buffer=buffer)) as items:
        async for item in items:
            if isinstance(item, Done):
                break
            read += 1
            await trio.sleep(0.005)  # a slow network peer
            most_ahead = max(most_ahead, emitted - read)
    assert read == 30
    # The channel holds `buffer` pieces; one more may be in flight in emit().
    assert most_ahead <= buffer + 1


async def test_a_reader_that_leaves_stops_the_worker() -> None:
    stopped_at: list[int] = []

    def work(emit: Emit) -> None:
        for i in range(10_000):
            if not emit(str(i)):
                stopped_at.append(i)
                return
        stopped_at.append(-1)

    async with aclosing(pieces(work, buffer=2)) as items:
        async for item in items:
            if item == "5":
                break
    # aclose() returned only after the worker did, and the worker stopped early.
    assert stopped_at and 5 <= stopped_at[0] < 20


async def test_cancelling_the_reader_stops_the_worker() -> None:
    finished = threading.Event()

    def work(emit: Emit) -> None:
        try:
            while emit("tick"):
                time.sleep(0.001)
        finally:
            finished.set()

    with trio.move_on_after(0.2):
        async for _ in pieces(work, buffer=1):
            pass
    assert finished.is_set()


async def test_run_cancellable_sets_the_flag_and_waits() -> None:
    polls: list[int] = []

    def work(cancel: threading.Event) -> str:
        for i in range(2000):
            if cancel.is_set():
                polls.append(i)
                return "stopped"
            time.sleep(0.005)
        return "ran out"

    with trio.move_on_after(0.1):
        await run_cancellable(work)
    assert polls, "the worker had not returned when run_cancellable did"
    assert await run_cancellable(lambda cancel: "done") == "done"
