"""protocols.content: the manifest, its canonical bytes and the content id; every
entry and bound refused with a typed error; any bytes a manifest or BadManifest."""

from __future__ import annotations

import random

import msgpack
import multihash  # type: ignore[import-untyped]
import pytest

from protocols.content import (
    MAX_FILES,
    MAX_MANIFEST,
    MIN_CHUNK,
    BadContentId,
    BadManifest,
    FileEntry,
    Manifest,
    ManifestTooLarge,
    cid_text,
    decode_manifest,
    digest,
    manifest_for,
    parse_cid,
)
from protocols.errors import FrameTooLarge, RemoteProtocolError


def raw(files: list[list[object]], chunks: list[bytes], chunk: int = MIN_CHUNK) -> bytes:
    body = {"v": 1, "chunk": chunk, "files": files, "chunks": chunks}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def test_digest_is_py_multihash_sha2_256() -> None:
    data = b"swarm" * 1000
    assert digest(data) == bytes(multihash.digest(data, "sha2-256").encode())


def test_round_trip_and_the_content_id() -> None:
    m = manifest_for([("model.xml", b"x" * 5000), ("sub/model.bin", b"b" * 9000)], MIN_CHUNK)
    assert [p.length for p in m.pieces()] == [4096, 904, 4096, 4096, 808]
    assert [p.file for p in m.pieces()] == [0, 0, 1, 1, 1]
    again = decode_manifest(m.encode())
    assert again == m and again.cid == m.cid and m.cid.startswith("Qm")
    assert parse_cid(m.cid) == m.content_id == digest(m.encode())
    assert cid_text(parse_cid(m.content_id)) == m.cid
    other = manifest_for([("model.xml", b"y" * 5000), ("sub/model.bin", b"b" * 9000)], MIN_CHUNK)
    assert other.cid != m.cid  # one byte of content changes the id


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "a/../../b",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/.",
        "C:evil",
        "a\\b",
        "a\x00b",
        "",
        "x" * 256,
        "/".join("d" * 9),
    ],
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(BadManifest):
        manifest_for([(name, b"x")], MIN_CHUNK)
    with pytest.raises(BadManifest):  # and from the wire, before anything is opened
        decode_manifest(raw([[name, 1]], [digest(b"x")]))


def test_duplicates_and_files_under_files_are_refused() -> None:
    with pytest.raises(BadManifest, match="twice"):
        manifest_for([("a", b"1"), ("a", b"2")], MIN_CHUNK)
    with pytest.raises(BadManifest, match="under another"):
        manifest_for([("a", b"1"), ("a/b", b"2")], MIN_CHUNK)


def test_bounds_are_too_large_errors() -> None:
    with pytest.raises(ManifestTooLarge) as big:
        decode_manifest(b"\x00" * (MAX_MANIFEST + 1))
    assert isinstance(big.value, FrameTooLarge) and isinstance(big.value, BadManifest)
    with pytest.raises(ManifestTooLarge):
        decode_manifest(raw([[f"f{i}", 0] for i in range(MAX_FILES + 1)], []))
    with pytest.raises(ManifestTooLarge):
        Manifest((FileEntry("a", 1),), 1024, (digest(b"x"),))  # chunk under the minimum
    with pytest.raises(ManifestTooLarge):
        # 2^40 bytes in 1 MiB chunks: far more chunks than a manifest may list
        Manifest((FileEntry("a", 1 << 40),), 1 << 20, ())


def test_wrong_chunk_lists_and_non_canonical_bytes_are_refused() -> None:
    with pytest.raises(BadManifest, match="chunk hashes"):
        decode_manifest(raw([["a", 5000]], [digest(b"x")]))
    with pytest.raises(BadManifest, match="multihash"):
        decode_manifest(raw([["a", 1]], [b"\x11\x14" + b"0" * 32]))
    m = manifest_for([("a", b"x" * 10)], MIN_CHUNK)
    reordered: bytes = msgpack.packb(
        {"chunks": list(m.chunks), "v": 1, "chunk": MIN_CHUNK, "files": [["a", 10]]},
        use_bin_type=True,
    )
    with pytest.raises(BadManifest, match="canonical"):
        decode_manifest(reordered)


def test_bad_content_ids() -> None:
    for text in ("", "not-base58!", "Qm", cid_text(b"\x11\x14" + b"0" * 20)):
        with pytest.raises(BadContentId):
            parse_cid(text)


def test_any_bytes_give_a_manifest_or_a_bad_manifest(seed: int) -> None:
    rng = random.Random(seed)
    good = manifest_for([("m.xml", b"x" * 9000), ("m.bin", b"y" * 100)], MIN_CHUNK).encode()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        try:
            decode_manifest(bytes(data))
        except BadManifest:
            pass
        except RemoteProtocolError as exc:  # pragma: no cover - would be a typing slip
            pytest.fail(f"untyped refusal {exc!r}")
