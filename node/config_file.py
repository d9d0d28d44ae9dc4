"""config.toml's [node] and [http] tables: every daemon flag, typed, with its default.

The file is read once, here, into a frozen ``FileSettings``; the CLI then lays
the flags given on the command line over it (a flag given wins; the repeatable
ones, --peer --bootstrap --allow --allow-file --model, add to the file's lists).
A key this reader does not know is refused with the key and the file named:
a typo must not be ignored silently. [[models]], [backends.NAME] and [router]
are read by the catalog and the router, as before.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.errors import ConfigError as RunnerConfigError
from runners.settings import Table

from .daemon import DEFAULT_LISTEN
from .errors import ConfigError

DEFAULT_HTTP = "127.0.0.1:8470"  # the gateway's port when none is given; busy: a free one
HTTP_OFF = "off"
TABLES = frozenset({"node", "http", "models", "backends", "router"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Each daemon flag (its argparse dest) and the config key that sets it. Flags
# missing here have no key on purpose, for the reason given.
FLAG_KEYS: dict[str, str] = {
    "listen": "node.listen",
    "peer": "node.peers",
    "bootstrap": "node.bootstrap",
    "mdns": "node.mdns",
    "dht": "node.dht",
    "heartbeat": "node.heartbeat",
    "dead_after": "node.dead_after",
    "max_queue": "node.max_queue",
    "grace": "node.grace",
    "allow": "node.allow",
    "allow_file": "node.allow_file",
    "swarm_key": "node.swarm_key",
    "cuda_probe": "node.cuda_probe",
    "no_models": "node.forward_only",
    "log_level": "node.log_level",
    "log_format": "node.log_format",
    "http": "http.listen",
    "http_token_env": "http.token_env",
    "http_insecure": "http.insecure",
    "strategy": "router.strategy",
    "model": "models",
}
NOT_IN_FILE = {
    "config": "names the file itself",
    "data_dir": "the file lives in the data dir",
}


@dataclass(frozen=True, slots=True)
class FileSettings:
    """What config.toml says of the node, defaults filled in. Paths as written."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    peers: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    dht: bool = True
    heartbeat: float = 5.0
    dead_after: float = 15.0
    max_queue: int = 64
    grace: float = 10.0
    allow: tuple[str, ...] = ()
    allow_file: tuple[str, ...] = ()
    swarm_key: str | None = None  # a path; None: DATA_DIR/swarm.key if it exists
    cuda_probe: bool = True
    forward_only: bool = False
    log_level: str | None = None  # None: INFO for the daemon
    log_format: str = "text"
    http_listen: str | None = None  # None: DEFAULT_HTTP, falling back to a free port
    http_token_env: str | None = None
    http_insecure: bool = False


def read(path: Path, *, required: bool) -> tuple[dict[str, Any], str]:
    """config.toml as data (empty when absent and not required), and its name."""
    if not required and not path.exists():
        return {}, str(path)
    try:
        return tomllib.loads(path.read_text()), str(path)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def settings(data: dict[str, Any], source: str) -> FileSettings:
    """The [node] and [http] tables of ``data`` (read from ``source``), checked."""
    unknown = sorted(set(data) - TABLES)
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(unknown)}")
    try:
        return _settings(data, source)
    except RunnerConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _settings(data: dict[str, Any], source: str) -> FileSettings:
    d = FileSettings()
    node = Table(data.get("node", {}), f"{source}: node")
    http = Table(data.get("http", {}), f"{source}: http")
    level = node.text("log_level", None, choices=LOG_LEVELS)
    out = FileSettings(
        listen=node.texts("listen", d.listen),
        peers=node.texts("peers", ()),
        bootstrap=node.texts("bootstrap", ()),
        mdns=node.flag("mdns", d.mdns),
        dht=node.flag("dht", d.dht),
        heartbeat=node.number("heartbeat", d.heartbeat, low=0.01, high=3600.0),
        dead_after=node.number("dead_after", d.dead_after, low=0.01, high=86400.0),
        max_queue=node.integer("max_queue", d.max_queue, low=0, high=1_000_000),
        grace=node.number("grace", d.grace, low=0.0, high=86400.0),
        allow=node.texts("allow", ()),
        allow_file=node.texts("allow_file", ()),
        swarm_key=node.text("swarm_key", None),
        cuda_probe=node.flag("cuda_probe", d.cuda_probe),
        forward_only=node.flag("forward_only", d.forward_only),
        log_level=level,
        log_format=node.text("log_format", d.log_format, choices=("text", "json")),
        http_listen=http.text("listen", None),
        http_token_env=http.text("token_env", None),
        http_insecure=http.flag("insecure", d.http_insecure),
    )
    node.done()
    http.done()
    return out
