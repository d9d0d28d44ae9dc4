"""What this node shares, by content id, and the manifests of files on its disk.

A share is a manifest and, for each of its files, the path this node read it
from. The blob server reads only those paths, at the offsets the manifest's
pieces name: a peer names a content id and a chunk index, never a path, so
nothing outside what was declared shareable (the models this node serves, and
``swarm models share PATH``) can be read.

Hashing a model's files takes a second or so per 100 MB, so each manifest is
kept in the data dir (``content/index/<key>.manifest``), keyed by the files'
absolute paths, sizes and modification times and the chunk size: a converted
model gets its manifest when it is first served, and every start after that
reads it back without hashing. Everything here that touches the disk blocks:
call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocols.content import (
    DEFAULT_CHUNK,
    BadManifest,
    FileEntry,
    Manifest,
    Piece,
    decode_manifest,
    digest,
)

INDEX_DIR = "index"
SHARES_FILE = "shares.json"  # what ``swarm models share PATH`` declared, read at start


@dataclass(frozen=True, slots=True)
class Share:
    manifest: Manifest
    paths: tuple[Path, ...]  # one per manifest file, in order
    label: str  # what it is: a model's name, or the shared path

    @property
    def content_id(self) -> bytes:
        return self.manifest.content_id


class Shares:
    """Content ids this node serves, and where each one's bytes lie."""

    def __init__(self) -> None:
        self._by_id: dict[bytes, Share] = {}
        self._pieces: dict[bytes, tuple[Piece, ...]] = {}

    def add(self, share: Share) -> bytes:
        cid = share.content_id
        self._by_id[cid] = share
        self._pieces[cid] = tuple(share.manifest.pieces())
        return cid

    def remove(self, cid: bytes) -> None:
        self._by_id.pop(cid, None)
        self._pieces.pop(cid, None)

    def get(self, cid: bytes) -> Share | None:
        return self._by_id.get(cid)

    def ids(self) -> list[bytes]:
        return list(self._by_id)

    def shares(self) -> list[Share]:
        return list(self._by_id.values())

    def read_chunk(self, cid: bytes, index: int) -> bytes | None:
        """Chunk ``index`` of ``cid`` as this node holds it; None when not shared or out
        of range. Blocks (a file read)."""
        share, pieces = self._by_id.get(cid), self._pieces.get(cid, ())
        if share is None or not 0 <= index < len(pieces):
            return None
        piece = pieces[index]
        with share.paths[piece.file].open("rb") as fh:
            fh.seek(piece.offset)
            return fh.read(piece.length)


def model_files(source: Path) -> list[tuple[str, Path]]:
    """The files a model file brings: an IR's .xml and .bin, else the file alone."""
    if source.suffix.lower() == ".xml":
        return [
            (source.name, source),
            (source.with_suffix(".bin").name, source.with_suffix(".bin")),
        ]
    return [(source.name, source)]


def dir_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` (links are not followed), by relative name."""
    if root.is_file():
        return [(root.name, root)]
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and not name.startswith("."):
                out.append((path.relative_to(root).as_posix(), path))
    return out


def manifest_of(
    files: Sequence[tuple[str, Path]], index_dir: Path | None, chunk_size: int = DEFAULT_CHUNK
) -> Manifest:
    """The manifest of ``files`` (name, path): read back from ``index_dir`` when the
    files are unchanged since it was made, else hashed (and kept there). Raises
    OSError for a file that does not read, BadManifest for a bad set of names."""
    stats = [(name, str(path.resolve()), path.stat()) for name, path in files]
    key_text = json.dumps(
        [chunk_size, [(n, p, s.st_size, s.st_mtime_ns) for n, p, s in stats]], sort_keys=True
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    kept = None if index_dir is None else index_dir / f"{key}.manifest"
    if kept is not None:
        with contextlib.suppress(OSError, BadManifest):
            manifest = decode_manifest(kept.read_bytes())
            if [(f.name, f.size) for f in manifest.files] == [(n, s.st_size) for n, _, s in stats]:
                return manifest
    hashes = []
    for _, path in files:
        with path.open("rb") as fh:
            while block := fh.read(chunk_size):
                hashes.append(digest(block))
    manifest = Manifest(
        tuple(FileEntry(n, s.st_size) for n, _, s in stats), chunk_size, tuple(hashes)
    )
    if kept is not None:
        with contextlib.suppress(OSError):
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(manifest.encode())
            tmp.replace(kept)
    return manifest


def share_of(
    files: Sequence[tuple[str, Path]],
    index_dir: Path | None,
    label: str,
    chunk_size: int = DEFAULT_CHUNK,
) -> Share:
    manifest = manifest_of(files, index_dir, chunk_size)
    return Share(manifest, tuple(p for _, p in files), label)


def declared_shares(content_dir: Path) -> list[str]:
    """The paths ``swarm models share`` declared in this data dir."""
    try:
        data = json.loads((content_dir / SHARES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in data if isinstance(p, str)] if isinstance(data, list) else []


def declare_share(content_dir: Path, path: Path) -> None:
    """Add ``path`` to what this data dir shares (read by the daemon at start)."""
    paths = declared_shares(content_dir)
    text = str(path.resolve())
    if text not in paths:
        paths.append(text)
    content_dir.mkdir(parents=True, exist_ok=True)
    tmp = content_dir / f"{SHARES_FILE}.tmp"
    tmp.write_text(json.dumps(paths, indent=2))
    tmp.replace(content_dir / SHARES_FILE)
