"""Shared fixtures: in-process nodes on loopback, with fake or real runners."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.daemon import Node, NodeConfig

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

NodeFactory = Callable[..., AbstractAsyncContextManager[Node]]


@pytest.fixture
def node_factory(tmp_path: Path) -> NodeFactory:
    """``async with node_factory("a", models=("fake:echo",)) as node:`` runs a real node."""
    counter = iter(range(1000))

    @asynccontextmanager
    async def start(name: str | None = None, **overrides: Any) -> AsyncIterator[Node]:
        name = name or f"node{next(counter)}"
        settings: dict[str, Any] = {
            "data_dir": tmp_path / name,
            "listen": (LOOPBACK,),
            "probe_cuda": False,
            "shutdown_grace_s": 2.0,
        }
        settings.update(overrides)
        node = Node(NodeConfig(**settings))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                await nursery.start(node.run)
            try:
                yield node
            finally:
                node.stop()

    return start
