"""The model cache: entries appear whole or not at all, and races end with one entry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runners import ir_cache

PARTS = {"package": "1.0", "recipe": "1"}
KEY = ir_cache.fingerprint(PARTS)


def staged(root: Path, content: bytes = b"weights") -> Path:
    path = ir_cache.new_staging(root)
    (path / "model.bin").write_bytes(content)
    (path / "model.xml").write_text("<net/>")
    return path


def test_fingerprint_is_stable_and_order_free() -> None:
    assert ir_cache.fingerprint({"a": "1", "b": "2"}) == ir_cache.fingerprint({"b": "2", "a": "1"})
    assert ir_cache.fingerprint({"a": "1"}) != ir_cache.fingerprint({"a": "2"})


def test_publish_makes_a_whole_entry(tmp_path: Path) -> None:
    assert ir_cache.find(tmp_path, KEY) is None
    path = ir_cache.publish(tmp_path, KEY, staged(tmp_path), PARTS)
    assert path == ir_cache.entry_path(tmp_path, KEY) and ir_cache.find(tmp_path, KEY) == path
    manifest = json.loads((path / ir_cache.MANIFEST).read_text())
    assert manifest["files"] == {"model.bin": 7, "model.xml": 6} and manifest["parts"] == PARTS
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging left behind


def test_second_publisher_keeps_the_first_entry(tmp_path: Path) -> None:
    first = ir_cache.publish(tmp_path, KEY, staged(tmp_path, b"first"), PARTS)
    second = ir_cache.publish(tmp_path, KEY, staged(tmp_path, b"second"), PARTS)
    assert second == first
    assert (first / "model.bin").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_publish_replaces_a_broken_entry(tmp_path: Path) -> None:
    broken = ir_cache.entry_path(tmp_path, KEY)
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"half")  # no manifest: a crash of old code, say
    path = ir_cache.publish(tmp_path, KEY, staged(tmp_path), PARTS)
    assert (path / "model.bin").read_bytes() == b"weights"
    assert ir_cache.find(tmp_path, KEY) == path


def test_only_plain_files_can_be_published(tmp_path: Path) -> None:
    path = staged(tmp_path)
    (path / "sub").mkdir()
    with pytest.raises(ValueError, match="plain files"):
        ir_cache.publish(tmp_path, KEY, path, PARTS)
    assert ir_cache.find(tmp_path, KEY) is None


def test_a_resized_file_invalidates_the_entry(tmp_path: Path) -> None:
    path = ir_cache.publish(tmp_path, KEY, staged(tmp_path), PARTS)
    (path / "model.bin").write_bytes(b"weights, grown")
    assert ir_cache.find(tmp_path, KEY) is None


def test_prune_keeps_the_current_entry_and_fresh_staging(tmp_path: Path) -> None:
    keep = ir_cache.publish(tmp_path, KEY, staged(tmp_path), PARTS)
    other = ir_cache.publish(tmp_path, "0" * 16, staged(tmp_path), PARTS)
    fresh = staged(tmp_path)
    old = staged(tmp_path)
    os.utime(old, (0, 0))
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")
    removed = ir_cache.prune(tmp_path, KEY)
    assert sorted(removed) == sorted([other.name, old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [keep.name, fresh.name, unrelated.name]
    )


def test_discard_of_a_missing_dir_is_quiet(tmp_path: Path) -> None:
    ir_cache.discard(tmp_path / "gone")
    assert list(tmp_path.iterdir()) == []
