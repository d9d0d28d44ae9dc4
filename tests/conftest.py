"""Shared fixtures: in-process nodes on loopback, with fake or real runners, and the
default model converted to OpenVINO IR once per session."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.config import NodeConfig
from node.daemon import Node
from node.jobs.verify import VerifyConfig

# scripts/ holds helpers shared by tests and benchmarks (netns.py).
sys.path.append(str(Path(__file__).resolve().parent.parent / "scripts"))
from runners import convert_minilm, ir_cache
from runners.base import Runner
from runners.openvino_embed import MODEL_NAME, OpenVINOEmbedRunner, cache_key

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
GARBAGE = b"not an IR "
SEED_ENV = "SWARM_TEST_SEED"

NodeFactory = Callable[..., AbstractAsyncContextManager[Node]]


@pytest.fixture
def node_factory(tmp_path: Path) -> NodeFactory:
    """``async with node_factory("a", models=("fake:echo",)) as node:`` runs a real node.

    ``runners`` are Runner objects built by the test, served beside the config's models.
    """
    counter = iter(range(1000))

    @asynccontextmanager
    async def start(
        name: str | None = None, *, runners: Sequence[Runner] = (), **overrides: Any
    ) -> AsyncIterator[Node]:
        name = name or f"node{next(counter)}"
        settings: dict[str, Any] = {
            "data_dir": tmp_path / name,
            "listen": (LOOPBACK,),
            "probe_cuda": False,
            "shutdown_grace_s": 2.0,
            # In-process nodes find each other through explicit peers unless a test
            # turns these on: multicast and the DHT would couple unrelated tests.
            "mdns": False,
            "dht": False,
            # Spot checks draw jobs at random and run them again elsewhere: extra jobs
            # that would blur other tests' counts. test_verify*.py turn them on.
            "verify": VerifyConfig(rate=0.0),
        }
        settings.update(overrides)
        node = Node(NodeConfig(**settings), runners=runners)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                await nursery.start(node.run)
            try:
                yield node
            finally:
                node.stop()

    return start


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of a test's random choices: ``$SWARM_TEST_SEED``, else a fresh one.

    Printed (pytest shows it with a failure's captured setup output) and kept as
    the test's ``seed`` user property (in its report; ``--junitxml`` with
    ``junit_family=legacy`` writes it), so a failure can be replayed.
    """
    given = os.environ.get(SEED_ENV)
    value = int(given) if given else random.SystemRandom().randrange(1 << 32)
    # Not the record_property fixture: it warns under the default xunit2, an error here.
    request.node.user_properties.append(("seed", value))
    print(f"seed {value} (replay with {SEED_ENV}={value})")
    return value


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the converted IR, made once for the whole session.

    Shared, so treat it as read-only: tests that damage a cache, or daemons
    that would write to it, work on copies. It is made by the default (auto
    precision) load, so it holds the fp32 and int8 entries and the measured
    precision choice, and every default load after it (daemons on copies
    included) opens the chosen entry without converting or measuring. The
    fp32 conversion (they cost ~10 s each) starts from a planted entry that
    looks whole (this build's fingerprint, a manifest, matching file sizes)
    but holds garbage, so it also proves that a damaged entry is detected,
    discarded and rebuilt: see
    test_runner_openvino.test_planted_damaged_entry_was_rebuilt.
    """
    path = tmp_path_factory.mktemp("models")
    root = path / MODEL_NAME
    staged = ir_cache.new_staging(root)
    for name in convert_minilm.FILES:
        (staged / name).write_bytes(GARBAGE * 100)
    planted = ir_cache.publish(root, cache_key(), staged, {"planted": "by the test"})
    assert ir_cache.find(root, cache_key()) == planted

    async def convert() -> None:
        runner = OpenVINOEmbedRunner(path)
        await runner.load()
        await runner.close()

    trio.run(convert)
    return path
