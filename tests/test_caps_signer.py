"""RecordSigner: every record it signs is admissible in order, and a full record's
version moves only with its content."""

from __future__ import annotations

from typing import Any

import pytest
from libp2p import generate_new_ed25519_identity

from capabilities.signing import RecordBook, RecordReplayed, verify_record
from node.membership.caps import RecordSigner


def test_full_records_resent_after_heartbeats_are_not_replays() -> None:
    body: dict[str, Any] = {"models": [{"name": "echo"}], "load": {"in_flight": 0}}
    signer = RecordSigner(generate_new_ed25519_identity(), lambda: dict(body))
    book = RecordBook()
    first = signer.full()
    book = book.admit(verify_record(first))
    version = signer.version
    for _ in range(3):  # heartbeats flow, then the full record is asked for again
        book = book.admit(verify_record(signer.heartbeat(0, {"in_flight": 1})))
        again = signer.full()
        book = book.admit(verify_record(again))  # would raise RecordReplayed before the fix
        assert again.seq > first.seq and again.body["version"] == version
    body["load"] = {"in_flight": 7}  # load alone does not make a new version
    assert signer.full().body["version"] == version
    body["models"] = [{"name": "echo"}, {"name": "other"}]
    assert signer.full().body["version"] > version  # content did
    with pytest.raises(RecordReplayed):
        book.admit(verify_record(first))  # the genuinely old record still is a replay


def test_heartbeats_carry_versions() -> None:
    signer = RecordSigner(generate_new_ed25519_identity(), lambda: {"models": []})
    beat = verify_record(signer.heartbeat(42, {"in_flight": 2})).body["heartbeat"]
    assert beat == {"version": signer.version, "known": 42, "load": {"in_flight": 2}}


def test_the_peer_sample_changes_without_a_new_version() -> None:
    body: dict[str, Any] = {"models": [], "peers": [["a", []]]}
    signer = RecordSigner(generate_new_ed25519_identity(), lambda: dict(body))
    version = signer.full().body["version"]
    body["peers"] = [["a", []], ["b", ["/ip4/127.0.0.1/tcp/1"]]]
    full = signer.heartbeat(0, {}) and signer.full()
    assert full.body["version"] == version and full.body["peers"] == body["peers"]


def test_member_heartbeats_say_how_many_peers_they_link() -> None:
    signer = RecordSigner(generate_new_ed25519_identity(), lambda: {"models": []})
    beat = verify_record(signer.heartbeat(0, {}, peers=7)).body["heartbeat"]
    assert beat["peers"] == 7
    assert "peers" not in verify_record(signer.heartbeat(0, {}, client=True)).body["heartbeat"]
