"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``predicate()`` holds; fail the test after ``timeout_s``."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (polling node state from outside is the point)
            await trio.sleep(0.01)
