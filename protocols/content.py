"""A model's content, addressed by what it is: a manifest and its content id.

Why: a node that joins a swarm should get a model from the peers that already
serve it, and must be able to check every byte it was given against a name it
trusts. The manifest lists the files (relative names and sizes), the chunk size
and each chunk's sha2-256 multihash; the content id is the sha2-256 multihash of
the manifest's canonical msgpack bytes, shown as base58 text (``Qm...``). A
peer's bytes are checked chunk by chunk against the manifest before they are
written, and the manifest against the id, so no peer is trusted for anything.

Chunks never span files: file ``i`` of size ``s`` has ``ceil(s / chunk_size)``
chunks, numbered on from the chunks of the files before it, so a chunk is one
``(file, offset, length)`` and a puller writes it with one ``pwrite``.

Everything here is pure. ``decode_manifest`` accepts only the canonical
encoding (re-encoding the decoded manifest must give the same bytes, so one
content has one id) and refuses, with typed errors:

    RemoteProtocolError
    └── BadManifest           not a manifest, or not canonical, or a bad entry:
        │                     a name with ``..``, an absolute path, a backslash,
        │                     a duplicate, a file that is also a directory
        └── ManifestTooLarge  (also a FrameTooLarge) over the bounds below
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import multihash  # type: ignore[import-untyped]

from .errors import FrameTooLarge, RemoteProtocolError

VERSION = 1
SHA2_256 = b"\x12\x20"  # the multihash prefix: code 0x12, 32 bytes of digest
DIGEST_LEN = len(SHA2_256) + 32
MIN_CHUNK = 4096
MAX_CHUNK = 8 << 20
DEFAULT_CHUNK = 1 << 20
MAX_FILES = 256
MAX_CHUNKS = 1 << 16
MAX_MANIFEST = MAX_CHUNKS * (DIGEST_LEN + 2) + 64 * 1024  # bytes of one encoded manifest
MAX_TOTAL = 64 << 30  # bytes of all files together
MAX_NAME = 255
MAX_DEPTH = 8


class BadManifest(RemoteProtocolError):
    """Bytes that are not a canonical manifest, or a manifest with a bad entry."""


class ManifestTooLarge(BadManifest, FrameTooLarge):
    """A manifest over the bounds: bytes, files, chunks, chunk size or total size."""


class BadContentId(BadManifest):
    """Text or bytes that are not a sha2-256 multihash."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str  # relative, '/'-separated
    size: int


@dataclass(frozen=True, slots=True)
class Piece:
    """Where chunk ``index`` lies: ``length`` bytes of file ``file`` at ``offset``."""

    index: int
    file: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[FileEntry, ...]
    chunk_size: int
    chunks: tuple[bytes, ...]  # each chunk's sha2-256 multihash, in order

    def __post_init__(self) -> None:
        check(self)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def pieces(self) -> Iterator[Piece]:
        index = 0
        for i, entry in enumerate(self.files):
            for offset in range(0, entry.size, self.chunk_size):
                yield Piece(index, i, offset, min(self.chunk_size, entry.size - offset))
                index += 1

    def encode(self) -> bytes:
        """The canonical bytes: the content id is their hash."""
        body = {
            "v": VERSION,
            "chunk": self.chunk_size,
            "files": [[f.name, f.size] for f in self.files],
            "chunks": list(self.chunks),
        }
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @property
    def content_id(self) -> bytes:
        return digest(self.encode())

    @property
    def cid(self) -> str:
        return cid_text(self.content_id)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The sha2-256 multihash of ``data`` (hashlib: the same bytes as py-multihash's)."""
    return SHA2_256 + hashlib.sha256(data).digest()


def cid_text(content_id: bytes) -> str:
    text: str = multihash.to_b58_string(content_id)
    return text


def parse_cid(text: str | bytes) -> bytes:
    """A content id from base58 text or multihash bytes; BadContentId if it is neither."""
    try:
        raw = multihash.from_b58_string(text) if isinstance(text, str) else bytes(text)
        decoded = multihash.decode(raw)
    except Exception:  # py-multihash raises several types (and base58 ValueError)
        raise BadContentId(f"not a content id: {str(text)[:80]!r}") from None
    if decoded.code != 0x12 or len(raw) != DIGEST_LEN:
        raise BadContentId("a content id is a sha2-256 multihash")
    return raw


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def check_name(name: str) -> None:
    """A share-relative file name: never absolute, never up, never odd bytes."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise BadManifest(f"a file name is 1 to {MAX_NAME} characters")
    if "\\" in name or "\x00" in name or any(ord(c) < 32 for c in name):
        raise BadManifest(f"file name {name[:80]!r} holds a backslash or control character")
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise BadManifest(f"file name {name[:80]!r} is an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadManifest(f"file name {name[:80]!r} has an empty, '.' or '..' part")
    if len(parts) > MAX_DEPTH:
        raise BadManifest(f"file name {name[:80]!r} is deeper than {MAX_DEPTH}")


def check(manifest: Manifest) -> None:
    """Every rule of a manifest; BadManifest or ManifestTooLarge naming the first broken."""
    if not MIN_CHUNK <= manifest.chunk_size <= MAX_CHUNK:
        raise ManifestTooLarge(f"chunk size must be {MIN_CHUNK} to {MAX_CHUNK} bytes")
    if not 0 < len(manifest.files) <= MAX_FILES:
        raise ManifestTooLarge(f"a manifest lists 1 to {MAX_FILES} files")
    names: set[str] = set()
    for entry in manifest.files:
        check_name(entry.name)
        if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size < 0:
            raise BadManifest(f"file {entry.name!r} has a bad size")
        if entry.name in names:
            raise BadManifest(f"file {entry.name!r} is listed twice")
        names.add(entry.name)
    for name in names:  # "a" and "a/b" cannot both be files
        parts = name.split("/")
        if any("/".join(parts[:i]) in names for i in range(1, len(parts))):
            raise BadManifest(f"file {name!r} lies under another file")
    if manifest.total_size > MAX_TOTAL:
        raise ManifestTooLarge(f"the files hold over {MAX_TOTAL} bytes")
    expected = sum(chunk_count(f.size, manifest.chunk_size) for f in manifest.files)
    if expected > MAX_CHUNKS:
        raise ManifestTooLarge(f"over {MAX_CHUNKS} chunks")
    if len(manifest.chunks) != expected:
        raise BadManifest(f"{len(manifest.chunks)} chunk hashes for {expected} chunks")
    for h in manifest.chunks:
        if not (isinstance(h, bytes) and len(h) == DIGEST_LEN and h.startswith(SHA2_256)):
            raise BadManifest("each chunk hash is a sha2-256 multihash")


def decode_manifest(payload: bytes) -> Manifest:
    """The manifest in ``payload``; BadManifest (or ManifestTooLarge) for anything else."""
    if len(payload) > MAX_MANIFEST:
        raise ManifestTooLarge(f"a manifest of {len(payload)} bytes is over {MAX_MANIFEST}")
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_NAME * 4,
            max_bin_len=DIGEST_LEN,
            max_array_len=MAX_CHUNKS,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise BadManifest(f"not a manifest: {type(exc).__name__}") from None
    if not isinstance(body, dict) or set(body) != {"v", "chunk", "files", "chunks"}:
        raise BadManifest("a manifest is a map of v, chunk, files, chunks")
    if body["v"] != VERSION:
        raise BadManifest(f"manifest version {body['v']!r}; this node reads {VERSION}")
    files, chunks, size = body["files"], body["chunks"], body["chunk"]
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise ManifestTooLarge(f"a manifest lists 1 to {MAX_FILES} files")
    if not isinstance(chunks, list) or isinstance(size, bool) or not isinstance(size, int):
        raise BadManifest("a manifest's chunks are a list and its chunk size a number")
    entries = []
    for row in files:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
            raise BadManifest("a file entry is [name, size]")
        if isinstance(row[1], bool) or not isinstance(row[1], int):
            raise BadManifest("a file entry is [name, size]")
        entries.append(FileEntry(row[0], row[1]))
    manifest = Manifest(tuple(entries), size, tuple(chunks))
    if manifest.encode() != payload:
        raise BadManifest("the manifest is not in canonical form")
    return manifest


def manifest_for(
    files: Sequence[tuple[str, bytes | bytearray]], chunk_size: int = DEFAULT_CHUNK
) -> Manifest:
    """A manifest for files held in memory (tests, small shares)."""
    hashes = []
    for _, data in files:
        view = memoryview(data)
        hashes += [digest(view[o : o + chunk_size]) for o in range(0, len(data), chunk_size)]
    entries = tuple(FileEntry(n, len(d)) for n, d in files)
    return Manifest(entries, chunk_size, tuple(hashes))


def describe(manifest: Manifest) -> dict[str, Any]:
    return {
        "content": manifest.cid,
        "size": manifest.total_size,
        "chunk_size": manifest.chunk_size,
        "chunks": len(manifest.chunks),
        "files": [{"name": f.name, "size": f.size} for f in manifest.files],
    }
