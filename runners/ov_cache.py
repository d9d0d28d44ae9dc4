"""Find a converted IR in the models dir, or make it once with a converter child process.

The recipe is the one ``openvino_embed`` follows (see ``ir_cache``): the
converter (``python -m runners.X ... STAGING_DIR ...``) writes into a private
staging dir, which is published whole with one rename under a fingerprint of
everything the IR depends on. Converting in a child keeps torch, nncf and their
seconds of GIL-holding imports out of the daemon.

Each (model, precision) gets a root of its own, because ``ir_cache.prune``
deletes every other fingerprint under a root: an int8 entry must not evict the
fp32 one that another runner serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from . import ir_cache
from .errors import ModelLoadError

log = logging.getLogger(__name__)
T = TypeVar("T")
PROGRESS_EVERY_S = 10.0


async def find_or_convert(
    root: Path,
    parts: Mapping[str, str],
    command: Callable[[Path], Sequence[str]],
    *,
    name: str,
    timeout_s: float,
) -> tuple[Path, float | None]:
    """The entry for ``parts`` under ``root`` and the seconds spent converting (None: cached).

    ``command(staging_dir)`` is the converter's argv after the interpreter.
    Raises ModelLoadError when the converter fails, times out or cannot start.
    """
    key = ir_cache.fingerprint(parts)
    path = await _blocking(name, ir_cache.find, root, key)
    if path is not None:
        return path, None
    log.info("converting %s to OpenVINO IR (first run; cached in %s)...", name, root)
    started = time.monotonic()
    staged = await _blocking(name, ir_cache.new_staging, root)
    published = False
    try:
        with trio.fail_after(timeout_s):
            done = await _with_progress(
                name,
                started,
                partial(
                    trio.run_process,
                    [sys.executable, *command(staged)],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=converter_env(),
                ),
            )
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-2000:]
            raise ModelLoadError(f"{name}: converter exited with {done.returncode}: {tail}")
        path = await _blocking(name, ir_cache.publish, root, key, staged, dict(parts))
        published = True
    except trio.TooSlowError as exc:
        raise ModelLoadError(f"{name}: conversion took over {timeout_s} s") from exc
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot run the converter: {exc}") from exc
    finally:
        if not published:
            with trio.CancelScope(shield=True), contextlib.suppress(ModelLoadError):
                await _blocking(name, ir_cache.discard, staged)
    with contextlib.suppress(ModelLoadError):  # tidying up is best effort
        await _blocking(name, ir_cache.prune, root, key)
    took = time.monotonic() - started
    log.info("converted %s to OpenVINO IR in %.1f s (cached: later starts skip this)", name, took)
    return path, took


async def _with_progress(name: str, started: float, work: Callable[[], Awaitable[T]]) -> T:
    """``work()`` with a progress line every PROGRESS_EVERY_S. Its OSError (the
    converter did not start) is raised as itself, not inside the nursery's group."""
    done: list[T] = []
    failed: list[OSError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_still_converting, name, started)
        try:
            done.append(await work())
        except OSError as exc:
            failed.append(exc)
        nursery.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return done[0]


async def _still_converting(name: str, started: float) -> None:
    """A line every PROGRESS_EVERY_S while a conversion runs: the node has not hung."""
    while True:
        await trio.sleep(PROGRESS_EVERY_S)
        log.info("still converting %s (%.0f s so far)", name, time.monotonic() - started)


class CorruptEntry(Exception):
    """A cache entry that looks whole but does not load, or fails its probe."""


async def open_or_convert(
    root: Path,
    parts: Mapping[str, str],
    command: Callable[[Path], Sequence[str]],
    opener: Callable[[Path], Awaitable[T]],
    *,
    name: str,
    timeout_s: float,
) -> tuple[T, float | None]:
    """``opener(entry)`` for the cached entry, converting it first if there is none.

    An entry ``opener`` finds damaged (it raises ``CorruptEntry``) is discarded
    and converted once more; a fresh conversion that is damaged too is a
    ModelLoadError. Returns what ``opener`` gave and the seconds spent
    converting (None: it came from the cache). Other entries under ``root``
    are pruned once one opens.
    """
    for _ in range(2):
        path, took = await find_or_convert(root, parts, command, name=name, timeout_s=timeout_s)
        try:
            opened = await opener(path)
        except CorruptEntry as exc:
            if took is not None:
                raise ModelLoadError(f"{name}: the fresh conversion is bad: {exc}") from exc
            log.warning("discarding damaged cache entry %s: %s", path, exc)
            await discard(path, name)
            continue
        with contextlib.suppress(ModelLoadError):  # stale entries, crash leftovers: best effort
            await _blocking(name, ir_cache.prune, root, ir_cache.fingerprint(parts))
        return opened, took
    raise ModelLoadError(f"{name}: the cache entry was damaged twice")  # a race: another writer


async def discard(path: Path, name: str) -> None:
    await _blocking(name, ir_cache.discard, path)


async def _blocking(name: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name}: model cache: {exc}") from exc


def converter_env() -> dict[str, str]:
    """The daemon's environment, offline, with ``runners`` importable as it is here."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
