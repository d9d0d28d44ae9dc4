"""protocols.frames: length-prefixed payloads out of bytes however they are cut."""

from __future__ import annotations

import random

import pytest

from protocols.errors import FrameTooLarge
from protocols.frames import Frames, frame


def test_payloads_come_out_whole_however_the_bytes_are_cut() -> None:
    seed = random.SystemRandom().randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randrange(0, 300)) for _ in range(50)]
    wire = b"".join(frame(p) for p in payloads)
    frames, got, at = Frames(300, "test"), [], 0
    while at < len(wire):
        cut = rng.randrange(1, 40)
        frames.feed(wire[at : at + cut])
        at += cut
        while (payload := frames.next_frame()) is not None:
            got.append(payload)
    assert got == payloads and not frames.partial


def test_a_size_over_the_limit_is_refused_from_its_four_bytes() -> None:
    frames = Frames(100, "test")
    frames.feed((100).to_bytes(4, "big")[:3])  # not yet a size
    with pytest.raises(FrameTooLarge, match="a test frame over 100 bytes"):
        frames.feed(b"\x65")  # 101


def test_an_unfinished_frame_is_partial() -> None:
    frames = Frames(100, "test")
    frames.feed(frame(b"hello")[:-1])
    assert frames.next_frame() is None and frames.partial
    frames.feed(b"o")
    assert frames.next_frame() == b"hello" and not frames.partial
