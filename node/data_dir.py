"""What a node keeps in its data dir, and how the CLI finds the daemon running there.

``~/.swarm/`` (or ``--data-dir``): ``identity.key`` (the node's), ``client.key``
(the CLI's), ``config.toml``, ``peerstore.sqlite``, ``reputation.json`` (what this
node's checks found of each peer's answers), ``models/`` and, while a
daemon runs, ``daemon.json`` (its pid, peer id, addresses, gateway URL and local
socket) and ``daemon.sock``, the socket the CLI of this machine reaches it on.
Nothing here imports the rest of the node, so the CLI reads it cheaply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("~/.swarm").expanduser()
STATE_FILE = "daemon.json"
CONFIG_FILE = "config.toml"  # read when present, or named by --config
IDENTITY_KEY = "identity.key"  # the node's libp2p identity
CLIENT_KEY = "client.key"  # the identity swarm submit/status/peers use
SOCKET_FILE = "daemon.sock"  # the running daemon's local socket (node.net.local)


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    """Where the CLI finds the running daemon of this data dir (written atomically)."""
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def remove_state(data_dir: Path) -> None:
    (data_dir / STATE_FILE).unlink(missing_ok=True)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The running daemon's pid, peer id, addresses, gateway URL (``http``, None
    when off) and local socket (``socket``, None when it has none), if one is
    running there."""
    path = data_dir / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return None  # a stale file from a daemon that died
    return state
