"""A directory cache of converted models that is never seen half-written.

Converting a model to OpenVINO IR takes seconds and a heavy toolchain, so it is
done once and kept under the node's models dir. Two daemons may share that dir
and any of them may crash mid-way, so an entry is built in a private staging
dir beside the cache and published with one ``rename``: readers see either no
entry or a whole one. A manifest, written last, names the entry's fingerprint
(the versions that made it) and the size of every file, so a stale entry, a
truncated file or a dir that lacks its manifest is never used::

    <root>/ir-<fingerprint>/       a published entry: files + manifest.json
    <root>/.tmp-<random>/          staging, still being written (or left by a crash)
    <root>/.trash-<random>/        an entry being deleted

Everything here blocks on the filesystem: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

MANIFEST = "manifest.json"
ENTRY_PREFIX = "ir-"
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# Staging dirs older than this were left by a crash: a live conversion takes seconds.
STALE_STAGING_S = 3600.0


def fingerprint(parts: Mapping[str, str]) -> str:
    """A short stable digest of what made an entry (package versions, recipe number)."""
    blob = json.dumps(dict(parts), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def entry_path(root: Path, key: str) -> Path:
    return root / f"{ENTRY_PREFIX}{key}"


def find(root: Path, key: str) -> Path | None:
    """The published entry for ``key`` if it is whole, else None."""
    path = entry_path(root, key)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["fingerprint"] != key or not isinstance(files, dict) or not files:
            return None
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path


def new_staging(root: Path) -> Path:
    """A fresh empty dir on the cache's filesystem, so publishing it is one rename."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    path.mkdir()
    return path


def publish(root: Path, key: str, staged: Path, parts: Mapping[str, str]) -> Path:
    """Seal ``staged`` with a manifest and make it the entry for ``key``.

    Files are synced before the rename, so a crash leaves the old state or the
    new one, never an entry with holes. If another process published a whole
    entry first, ours is dropped and theirs returned.
    """
    files: dict[str, int] = {}
    for item in sorted(staged.iterdir()):
        if not item.is_file() or item.name == MANIFEST:
            raise ValueError(f"staged entry may only hold plain files, found {item.name!r}")
        _fsync(item)
        files[item.name] = item.stat().st_size
    manifest = {"fingerprint": key, "parts": dict(parts), "files": files, "created": time.time()}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync(staged / MANIFEST)
    _fsync(staged)
    target = entry_path(root, key)
    for _ in range(2):
        try:
            os.rename(staged, target)
        except OSError:
            # The target exists (rename of a dir onto a non-empty dir fails).
            if find(root, key) is not None:
                discard(staged)
                return target
            discard(target)  # a broken entry: move it out of the way, then retry once
            continue
        _fsync(root)
        return target
    raise OSError(f"could not publish {staged} as {target}")


def discard(path: Path) -> None:
    """Remove an entry or staging dir; readers see it vanish at once (rename first)."""
    trash = path.parent / f"{TRASH_PREFIX}{secrets.token_hex(8)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, keep: str, *, stale_after_s: float = STALE_STAGING_S) -> list[str]:
    """Delete entries of other fingerprints and leftovers of crashes; return their names.

    On POSIX a process that already compiled a deleted entry keeps working: its
    open files stay readable until closed.
    """
    removed: list[str] = []
    now = time.time()
    try:
        children = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for child in children:
        name = child.name
        if name.startswith(ENTRY_PREFIX) and name != entry_path(root, keep).name:
            discard(child)
        elif name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            try:
                age = now - child.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < stale_after_s:
                continue  # maybe another process is writing it right now
            shutil.rmtree(child, ignore_errors=True)
        else:
            continue
        removed.append(name)
    return removed


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot sync a dir
            os.fsync(fd)
    finally:
        os.close(fd)
