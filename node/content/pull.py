"""Pull content from several providers at once, checking every chunk, resumable.

The content id names the manifest, so the manifest is taken from any provider
and checked against the id; every chunk is then checked against its multihash
in the manifest before it is written. The chunks still missing form one queue,
and each provider's workers take the next from it: a fast provider takes more,
a slow one fewer, and a provider that is gone just stops taking. A provider
that sends a chunk that does not match is struck for the rest of the pull (its
chunk goes back to the queue for the others); one that fails otherwise (gone,
refused, slow) drops out the same way, without the strike.

On disk, beside the finished content (``<root>/<cid>/``)::

    <root>/.partial-<cid>/manifest      the checked manifest
    <root>/.partial-<cid>/verified      one byte per chunk: 1 once written and checked
    <root>/.partial-<cid>/files/...     the files, at their final sizes (sparse)
    <root>/<cid>.manifest               once finished: the manifest, to share it on

An interrupted pull leaves that dir; the next pull of the same id takes it up,
checking again the chunks it marks (a crash may have left a mark without its
bytes), and fetches only the rest. When every chunk is in, ``files`` is renamed
to ``<root>/<cid>``: a reader sees no content or the whole of it.

Errors: ``PullFailed`` (a NodeError) when no provider is left and chunks are
missing, or none gave a manifest that matches the id.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.errors import NodeError
from protocols.content import (
    MAX_MANIFEST,
    BadManifest,
    Manifest,
    Piece,
    cid_text,
    decode_manifest,
    digest,
)
from protocols.errors import ConfigError, RemoteError

from .blob import MANIFEST, BlobClient, BlobUnavailable

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
MANIFEST_SUFFIX = ".manifest"  # <root>/<cid>.manifest, beside <root>/<cid>/


class PullFailed(NodeError):
    """The content could not be completed from the providers there were."""


@dataclass(frozen=True, slots=True)
class PullConfig:
    streams_per_provider: int = 2  # exchanges in flight to each provider
    chunk_timeout_s: float = 30.0
    # A manifest may name up to 64 GiB: a pull takes at most this much, and never
    # more than the disk has free (the files are made at their full sizes at once).
    max_bytes: int = 32 << 30

    def __post_init__(self) -> None:
        if not 1 <= self.streams_per_provider <= 16:
            raise ConfigError("content.streams_per_provider must be 1 to 16")
        if self.chunk_timeout_s <= 0:
            raise ConfigError("content.chunk_timeout_s must be positive")


@dataclass
class Progress:
    """What a pull has done so far (read by progress displays while it runs)."""

    content: str
    total_bytes: int = 0
    done_bytes: int = 0
    resumed_bytes: int = 0  # of done_bytes, found on disk from an earlier pull
    chunks: int = 0
    done_chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    active: set[str] = field(default_factory=set)  # providers taking chunks now
    by_provider: dict[str, int] = field(default_factory=dict)  # bytes each one sent
    struck: dict[str, str] = field(default_factory=dict)  # provider -> why
    dropped: dict[str, str] = field(default_factory=dict)  # provider -> why (no strike)
    finished: bool = False

    @property
    def rate(self) -> float:
        """Bytes a second fetched in this pull (resumed bytes not counted)."""
        took = time.monotonic() - self.started
        return (self.done_bytes - self.resumed_bytes) / took if took > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "resumed_bytes": self.resumed_bytes,
            "chunks": self.chunks,
            "done_chunks": self.done_chunks,
            "rate": round(self.rate, 1),
            "providers": sorted(self.active),
            "by_provider": dict(self.by_provider),
            "struck": dict(self.struck),
            "finished": self.finished,
        }


def content_path(root: Path, content_id: bytes) -> Path:
    return root / cid_text(content_id)


def have(root: Path, content_id: bytes) -> bool:
    return content_path(root, content_id).is_dir()


def pulled_manifest(root: Path, cid: str) -> Manifest | None:
    """The manifest of content pulled into ``root`` earlier, if it is whole. Blocks."""
    try:
        data = (root / f"{cid}{MANIFEST_SUFFIX}").read_bytes()
        manifest = decode_manifest(data)
    except (OSError, BadManifest):
        return None
    return manifest if cid_text(digest(data)) == cid else None


class _Disk:
    """The partial dir of one pull. Every method blocks: call from a worker thread."""

    def __init__(self, partial: Path, manifest: Manifest) -> None:
        self.partial = partial
        self.manifest = manifest
        self.files = partial / "files"
        self._paths = [self.files / f.name for f in manifest.files]
        self._bitmap = partial / "verified"

    def prepare(self) -> list[bool]:
        """Files at their sizes and the verified marks, each mark checked again."""
        self.files.mkdir(parents=True, exist_ok=True)
        (self.partial / "manifest").write_bytes(self.manifest.encode())
        for entry, path in zip(self.manifest.files, self._paths, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:  # creates it; keeps what an earlier pull wrote
                fh.truncate(entry.size)
        count = len(self.manifest.chunks)
        try:
            marks = bytearray(self._bitmap.read_bytes()[:count])
        except OSError:
            marks = bytearray()
        marks += bytes(count - len(marks))
        done = [False] * count
        for piece in self.manifest.pieces():
            if marks[piece.index] and self.read(piece) is not None:
                done[piece.index] = True
        self._bitmap.write_bytes(bytes(1 if d else 0 for d in done))
        return done

    def read(self, piece: Piece) -> bytes | None:
        with self._paths[piece.file].open("rb") as fh:
            fh.seek(piece.offset)
            data = fh.read(piece.length)
        return data if digest(data) == self.manifest.chunks[piece.index] else None

    def write(self, piece: Piece, data: bytes) -> bool:
        """Check ``data`` against the manifest and write it; False when it does not match."""
        if len(data) != piece.length or digest(data) != self.manifest.chunks[piece.index]:
            return False
        fd = os.open(self._paths[piece.file], os.O_WRONLY)
        try:
            os.pwrite(fd, data, piece.offset)
        finally:
            os.close(fd)
        fd = os.open(self._bitmap, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x01", piece.index)
        finally:
            os.close(fd)
        return True

    def finish(self, final: Path) -> None:
        # The manifest stays beside the content: the node shares it on from there.
        kept = final.with_name(final.name + MANIFEST_SUFFIX)
        kept.write_bytes(self.manifest.encode())
        for path in self._paths:  # the bytes reach the disk before the name does
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.files.rename(final)
        shutil.rmtree(self.partial, ignore_errors=True)


class Puller:
    """One pull of ``content_id`` into ``root`` from ``providers`` (peer ids)."""

    def __init__(
        self,
        host: Any,
        content_id: bytes,
        root: Path,
        config: PullConfig = PullConfig(),
        *,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.host = host
        self.content_id = content_id
        self.root = root
        self.config = config
        self.progress = Progress(cid_text(content_id))
        self._on_progress = on_progress
        self._pending: collections.deque[Piece] = collections.deque()
        self._in_flight = 0
        self._changed = trio.Event()
        self._disk: _Disk | None = None

    @property
    def final(self) -> Path:
        return content_path(self.root, self.content_id)

    @property
    def partial(self) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{cid_text(self.content_id)}"

    async def run(self, providers: Sequence[str]) -> Path:
        """The finished content's dir; PullFailed when it cannot be completed."""
        if have(self.root, self.content_id):
            return self.final
        providers = [p for p in dict.fromkeys(providers) if p != str(self.host.get_id())]
        manifest = await self._manifest(providers)
        await self._check_room(manifest)
        disk = self._disk = _Disk(self.partial, manifest)
        done = await trio.to_thread.run_sync(disk.prepare)
        p = self.progress
        p.total_bytes, p.chunks = manifest.total_size, len(manifest.chunks)
        p.done_bytes = p.done_chunks = 0  # counted afresh: this may be a second try
        self._pending.clear()
        for piece in manifest.pieces():
            if done[piece.index]:
                p.done_bytes += piece.length
                p.done_chunks += 1
            else:
                self._pending.append(piece)
        p.resumed_bytes = p.done_bytes
        p.started = time.monotonic()
        self._report()
        if self._pending:
            async with trio.open_nursery() as nursery:
                for provider in providers:
                    if provider in p.struck:
                        continue
                    p.active.add(provider)
                    nursery.start_soon(self._provider, provider)
        if self._pending:
            raise PullFailed(
                f"{p.content}: {len(self._pending)} of {p.chunks} chunks missing and no "
                f"provider left (struck: {sorted(p.struck)}, dropped: {sorted(p.dropped)})"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(disk.finish, self.final)
        p.finished = True
        self._report()
        log.info(
            "pulled %s: %d bytes at %.1f MB/s from %s",
            p.content,
            p.total_bytes,
            p.rate / 1e6,
            ", ".join(f"{k[-6:]}={v}" for k, v in p.by_provider.items()) or "disk",
        )
        return self.final

    async def _check_room(self, manifest: Manifest) -> None:
        size, name = manifest.total_size, self.progress.content
        if size > self.config.max_bytes:
            raise PullFailed(f"{name}: {size} bytes, over this node's {self.config.max_bytes}")
        self.root.mkdir(parents=True, exist_ok=True)
        free = (await trio.to_thread.run_sync(shutil.disk_usage, self.root)).free
        if size > free:
            raise PullFailed(f"{name}: {size} bytes, and {free} free on the disk")

    async def _manifest(self, providers: Sequence[str]) -> Manifest:
        """The manifest from an earlier pull's dir, else from the first provider whose
        answer hashes to the content id (one that sends another is struck)."""
        kept = self.partial / "manifest"
        with contextlib.suppress(OSError, BadManifest):
            data = await trio.to_thread.run_sync(kept.read_bytes)
            if digest(data) == self.content_id:
                return decode_manifest(data)
        for provider in providers:
            client = BlobClient(self.host, provider, timeout_s=self.config.chunk_timeout_s)
            try:
                data = await client.get(self.content_id, MANIFEST, MAX_MANIFEST)
                if digest(data) != self.content_id:
                    self._strike(provider, "sent a manifest that is not the content's")
                    continue
                return decode_manifest(data)
            except BadManifest as exc:  # it hashed right: the content itself is bad
                raise PullFailed(f"{self.progress.content}: a bad manifest: {exc}") from exc
            except (BlobUnavailable, RemoteError) as exc:
                self.progress.dropped[provider] = str(exc)
            finally:
                await client.close()
        raise PullFailed(f"{self.progress.content}: no provider gave its manifest")

    async def _provider(self, provider: str) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.streams_per_provider):
                    nursery.start_soon(self._worker, provider, nursery.cancel_scope)
        finally:
            self.progress.active.discard(provider)
            self._report()

    async def _worker(self, provider: str, scope: trio.CancelScope) -> None:
        client = BlobClient(self.host, provider, timeout_s=self.config.chunk_timeout_s)
        disk = self._disk
        assert disk is not None  # set before any worker starts
        try:
            while (piece := await self._next()) is not None:
                self._in_flight += 1
                ok = False
                try:
                    data = await client.get(self.content_id, piece.index, piece.length)
                    ok = await trio.to_thread.run_sync(disk.write, piece, data)
                    if not ok:
                        self._strike(provider, f"chunk {piece.index} does not match its hash")
                        scope.cancel()
                        return
                    p = self.progress
                    p.done_bytes += piece.length
                    p.done_chunks += 1
                    p.by_provider[provider] = p.by_provider.get(provider, 0) + piece.length
                    self._report()
                except (BlobUnavailable, RemoteError) as exc:
                    self.progress.dropped.setdefault(provider, str(exc))
                    scope.cancel()  # this provider's other streams stop too
                    return
                finally:
                    self._in_flight -= 1
                    if not ok:
                        self._pending.appendleft(piece)  # for another provider
                    self._wake()
        finally:
            with trio.CancelScope(shield=True):
                await client.close()

    async def _next(self) -> Piece | None:
        """The next missing chunk; None when none is missing and none is in flight
        (a chunk in flight may fail and come back, so a worker waits for it)."""
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._in_flight == 0:
                return None
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _strike(self, provider: str, why: str) -> None:
        log.warning("pull %s: provider %s struck: %s", self.progress.content, provider, why)
        self.progress.struck[provider] = why
        self.progress.active.discard(provider)

    def _report(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.progress)
