"""/swarm/blob/1.0.0's codec and pacing, sans-IO: round trips, bounds, and any bytes
a message or a RemoteProtocolError."""

from __future__ import annotations

import random

import pytest

from node.content.blob import (
    MANIFEST,
    Data,
    Decoder,
    Get,
    Pacer,
    Refused,
    encode,
)
from protocols.codes import ErrorCode
from protocols.content import digest
from protocols.errors import FrameTooLarge, RemoteProtocolError

CID = digest(b"content")


def decoded(frame: bytes, limit: int = 1 << 20) -> object:
    decoder = Decoder(limit)
    for i in range(len(frame)):  # a byte at a time: no read boundary matters
        decoder.feed(frame[i : i + 1])
    return decoder.next_message()


def test_round_trips() -> None:
    for message in (
        Get(CID, MANIFEST),
        Get(CID, 41),
        Data(b"\x00" * 1000),
        Refused(ErrorCode.MODEL_NOT_FOUND),
        Refused(ErrorCode.OVERLOADED, 1.5),
    ):
        assert decoded(encode(message)) == message


def test_frames_over_the_limit_are_refused_before_they_are_read() -> None:
    decoder = Decoder(256)
    with pytest.raises(FrameTooLarge):
        decoder.feed((10_000).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError):  # a chunk bigger than the caller expects
        decoded(encode(Data(b"x" * 5000)), limit=1000)


def test_bad_requests_are_remote_protocol_errors() -> None:
    import msgpack

    for body in (
        {"t": "get", "cid": b"short", "i": 0},
        {"t": "get", "cid": CID, "i": -2},
        {"t": "get", "cid": CID, "i": True},
        {"t": "no", "code": "NOT_A_CODE", "retry": 0},
        {"t": "no", "code": "BAD_REQUEST", "retry": 1e9},
        {"t": "what"},
        [1, 2],
    ):
        payload = msgpack.packb(body, use_bin_type=True)
        with pytest.raises(RemoteProtocolError):
            decoded(len(payload).to_bytes(4, "big") + payload)


def test_any_bytes_give_a_message_or_a_remote_protocol_error(seed: int) -> None:
    rng = random.Random(seed)
    frames = [encode(Get(CID, 3)), encode(Data(b"abc" * 50)), encode(Refused(ErrorCode.INTERNAL))]
    for _ in range(3000):
        data = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        decoder = Decoder(4096)
        try:
            decoder.feed(bytes(data))
            decoder.next_message()
        except RemoteProtocolError:
            pass


def test_the_pacer_holds_the_rate_over_all_uploads() -> None:
    now = [0.0]
    pacer = Pacer(1000.0, clock=lambda: now[0])
    assert pacer.book(500) == 0.0  # the first chunk goes at once
    assert pacer.book(500) == pytest.approx(0.5)  # the next waits for the first's time
    assert pacer.book(1000) == pytest.approx(1.0)
    now[0] = 10.0  # idle time is not saved up beyond one chunk
    assert pacer.book(1000) == 0.0 and pacer.book(10) == pytest.approx(1.0)
    assert Pacer(0.0).book(1 << 30) == 0.0  # no cap


def test_progress_is_a_bar_on_a_terminal_and_a_few_lines_otherwise() -> None:
    import io

    from node.content.progress import ProgressDisplay
    from node.content.pull import Progress

    def steps(display: ProgressDisplay) -> None:
        p = Progress("QmWge1bPigWgL4Yo5uEDswznLJUwc8dCFj8SFjCSV1Q5nQ", total_bytes=10_000_000)
        p.active = {"b", "c"}
        for done in range(0, 10_000_001, 100_000):
            p.done_bytes = done
            display(p)
        p.finished = True
        display(p)
        display(p)  # after the end: nothing more

    bar = io.StringIO()
    steps(ProgressDisplay(bar, terminal=True, every_s=3600))
    assert bar.getvalue().startswith("\r[") and bar.getvalue().endswith("\n")
    assert "[" + "#" * 28 + "]" in bar.getvalue() and "2 provider(s)" in bar.getvalue()
    lines = io.StringIO()
    steps(ProgressDisplay(lines, terminal=False, every_s=3600))
    written = lines.getvalue().splitlines()
    assert len(written) == 2 and written[-1].startswith("pulled ")  # first and last only
    assert "10.0/10.0 MB 100%" in written[-1] and "\r" not in lines.getvalue()
