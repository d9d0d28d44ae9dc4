"""Who may use this node: a private swarm's pre-shared key and a peer-id allow-list.

Two independent gates. The swarm key (the IPFS ``swarm.key`` format, a 32-byte
hex secret) encrypts every connection under it, so a node without the key never
completes a handshake: it cannot submit work, read a record, or even learn the
peer ids. The allow-list acts after the handshake, on the authenticated peer id
of each stream: anyone else gets UNAUTHORIZED, and the refusal is logged and
counted. (libp2p's connection gating knows IP ranges only, so the check lives in
our handlers.)
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from protocols.errors import ConfigError

log = logging.getLogger(__name__)

_KEY_HEADER = ("/key/swarm/psk/1.0.0/", "/base16/")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
MAX_TRACKED_REFUSALS = 1024
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{30,128}")


def looks_like_peer_id(text: str) -> bool:
    """Whether ``text`` is spelt like a peer id (base58, like 12D3KooW...)."""
    return _PEER_ID.fullmatch(text) is not None


def new_swarm_key_text() -> str:
    """A fresh swarm key file's text (share it with every member of the swarm)."""
    return "\n".join([*_KEY_HEADER, secrets.token_hex(32)]) + "\n"


def key_fingerprint(key: str) -> str:
    """16 hex digits naming a swarm key without revealing it (a hash of it)."""
    return hashlib.sha256(f"swarm key fingerprint:{key.lower()}".encode()).hexdigest()[:16]


def load_swarm_key(path: Path) -> str:
    """The 64-hex-digit key from a swarm.key file (or a file holding just the hex)."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read the swarm key {path}: {exc}") from exc
    key = lines[-1] if lines else ""
    if lines[:-1] not in ([], list(_KEY_HEADER)) or not _HEX64.fullmatch(key):
        raise ConfigError(
            f"{path} is not a swarm key: expected '/key/swarm/psk/1.0.0/', '/base16/' "
            "and 64 hex digits (make one with 'swarm keygen')"
        )
    return key.lower()


def load_allow_list(ids: Iterable[str], files: Iterable[Path]) -> frozenset[str] | None:
    """Peer ids from flags and files (one per line, # comments); None = everyone."""
    allowed = {i.strip() for i in ids if i.strip()}
    given = bool(allowed)
    for path in files:
        given = True
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the allow-list {path}: {exc}") from exc
        for line in text.splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                allowed.add(entry)
    bad = [i for i in allowed if not looks_like_peer_id(i)]
    if bad:
        raise ConfigError(f"not peer ids (base58, like 12D3KooW...): {sorted(bad)}")
    return frozenset(allowed) if given else None


@dataclass
class AccessPolicy:
    """The allow-list check every handler makes; counts what it refuses."""

    allowed: frozenset[str] | None = None  # None: any peer that completed the handshake
    refused: int = 0
    refused_by_peer: dict[str, int] = field(default_factory=dict)

    def member(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may be in our swarm at all (no counting: our own check)."""
        return self.allowed is None or peer_id in self.allowed

    def permits(self, peer_id: str) -> bool:
        if self.allowed is None or peer_id in self.allowed:
            return True
        self.refused += 1
        seen = self.refused_by_peer.get(peer_id)
        if seen is None:
            log.warning("refused peer %s: not in the allow-list", peer_id)  # once per peer
            if len(self.refused_by_peer) >= MAX_TRACKED_REFUSALS:
                return False  # new identities are free to make: keep the map bounded
            seen = 0
        self.refused_by_peer[peer_id] = seen + 1
        return False
