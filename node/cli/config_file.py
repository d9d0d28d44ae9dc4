"""config.toml's [node], [http] and [grpc] tables: every daemon flag, typed, with its default.

The file is read once, here, into a frozen ``FileSettings``; ``node_config``
then lays the flags given on the command line over it (a flag given wins; the repeatable
ones, --peer --bootstrap --allow --allow-file --public-addr --model, add to the file's
lists).
A key this reader does not know is refused with the key and the file named:
a typo must not be ignored silently. [[models]], [backends.NAME] and [router]
are read by the catalog and the router, as before; [fairness] by the fair-share
ledger (``node.jobs.fairness``), --fair-share overriding its ``enabled``;
[verify] by verification (``node.jobs.verify``).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from node.config import NodeConfig
from node.content.config import ContentConfig
from node.data_dir import CONFIG_FILE as CONFIG_FILE  # re-exported: their home was here
from node.defaults import DEFAULT_GRPC as DEFAULT_GRPC
from node.defaults import DEFAULT_HTTP as DEFAULT_HTTP
from node.defaults import DEFAULT_LISTEN
from node.gateway import GatewayConfig
from node.gateway.config import GrpcConfig
from node.jobs.fairness import FairnessConfig
from node.jobs.router import RouterConfig, Strategy
from node.jobs.verify import VerifyConfig
from node.membership.config import MembershipConfig
from node.net.access import load_allow_list, load_swarm_key
from node.reach.config import Mode, ReachConfig
from node.reach.relay_service import RelayServiceConfig
from protocols.config import Table
from protocols.content import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK
from protocols.errors import ConfigError
from runners.catalog import (
    DEFAULT_MODEL,
    ModelSpec,
    ModelSpecError,
    parse_model_spec,
    specs_from_config,
)

T = TypeVar("T")

HTTP_OFF = "off"
TABLES = frozenset(
    {"node", "http", "grpc", "models", "backends", "router", "relay", "fairness", "verify"}
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Each daemon flag (its argparse dest) and the config key that sets it. Flags
# missing here have no key on purpose, for the reason given.
FLAG_KEYS: dict[str, str] = {
    "listen": "node.listen",
    "peer": "node.peers",
    "bootstrap": "node.bootstrap",
    "mdns": "node.mdns",
    "dht": "node.dht",
    "reachability": "node.reachability",
    "public_addr": "node.public_addrs",
    "relay_service": "node.relay_service",
    "heartbeat": "node.heartbeat",
    "dead_after": "node.dead_after",
    "max_queue": "node.max_queue",
    "upload_rate": "node.upload_rate",
    "max_uploads": "node.max_uploads",
    "chunk_size": "node.chunk_size",
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
    "grpc": "grpc.listen",
    "grpc_token_env": "grpc.token_env",
    "grpc_insecure": "grpc.insecure",
    "strategy": "router.strategy",
    "fair_share": "fairness.enabled",
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
    reachability: str = "auto"
    public_addrs: tuple[str, ...] = ()
    relay_service: bool = True
    heartbeat: float = 5.0
    dead_after: float = 15.0
    max_queue: int = 64
    upload_rate: float = 0.0
    max_uploads: int = 8
    chunk_size: int = DEFAULT_CHUNK
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
    grpc_listen: str | None = None  # None: DEFAULT_GRPC, falling back to a free port
    grpc_token_env: str | None = None  # None: http_token_env's (the same token)
    grpc_insecure: bool = False


def read(path: Path, *, required: bool) -> tuple[dict[str, Any], str]:
    """config.toml as data (empty when absent and not required), and its name."""
    if not required and not path.exists():
        return {}, str(path)
    try:
        return tomllib.loads(path.read_text()), str(path)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def settings(data: dict[str, Any], source: str) -> FileSettings:
    """The [node], [http] and [grpc] tables of ``data`` (read from ``source``), checked."""
    unknown = sorted(set(data) - TABLES)
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(unknown)}")
    return _settings(data, source)


def _settings(data: dict[str, Any], source: str) -> FileSettings:
    d = FileSettings()
    node = Table(data.get("node", {}), f"{source}: node")
    http = Table(data.get("http", {}), f"{source}: http")
    grpc = Table(data.get("grpc", {}), f"{source}: grpc")
    level = node.text("log_level", None, choices=LOG_LEVELS)
    out = FileSettings(
        listen=node.texts("listen", d.listen),
        peers=node.texts("peers", ()),
        bootstrap=node.texts("bootstrap", ()),
        mdns=node.flag("mdns", d.mdns),
        dht=node.flag("dht", d.dht),
        reachability=node.text(
            "reachability", d.reachability, choices=tuple(m.value for m in Mode)
        ),
        public_addrs=node.texts("public_addrs", ()),
        relay_service=node.flag("relay_service", d.relay_service),
        heartbeat=node.number("heartbeat", d.heartbeat, low=0.01, high=3600.0),
        dead_after=node.number("dead_after", d.dead_after, low=0.01, high=86400.0),
        max_queue=node.integer("max_queue", d.max_queue, low=0, high=1_000_000),
        upload_rate=node.number("upload_rate", d.upload_rate, low=0.0, high=1e12),
        max_uploads=node.integer("max_uploads", d.max_uploads, low=1, high=1024),
        chunk_size=node.integer("chunk_size", d.chunk_size, low=MIN_CHUNK, high=MAX_CHUNK),
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
        grpc_listen=grpc.text("listen", None),
        grpc_token_env=grpc.text("token_env", None),
        grpc_insecure=grpc.flag("insecure", d.grpc_insecure),
    )
    node.done()
    http.done()
    grpc.done()
    return out


# -- the flags laid over the file ------------------------------------------------------


def _models(args: argparse.Namespace, config: dict[str, Any], source: str) -> tuple[ModelSpec, ...]:
    """The models of config.toml, then those of --model; the default if none.

    Every declaration is validated here, before anything starts: a typo is bad
    usage, said at once with the field it is in.
    """
    try:
        specs = specs_from_config(config, source) if config else []
        specs += [parse_model_spec(text) for text in args.model or ()]
        if not specs:
            specs.append(parse_model_spec(DEFAULT_MODEL))
    except ModelSpecError as exc:
        raise ConfigError(str(exc)) from exc
    names = [s.name.lower() for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"models declared twice: {', '.join(twice)}")
    return tuple(specs)


def _router(args: argparse.Namespace, config: dict[str, Any], source: str) -> RouterConfig:
    """config.toml's [router] table; --strategy overrides its strategy."""
    table = config.get("router")
    router = (
        RouterConfig()
        if table is None
        else RouterConfig.from_table(Table(table, f"{source}: router"))
    )
    if args.strategy is not None:
        router = dataclasses.replace(router, strategy=Strategy(args.strategy))
    return router


def _fairness(args: argparse.Namespace, config: dict[str, Any], source: str) -> FairnessConfig:
    """config.toml's [fairness] table; --fair-share / --no-fair-share overrides enabled."""
    table = config.get("fairness")
    fairness = (
        FairnessConfig()
        if table is None
        else FairnessConfig.from_table(Table(table, f"{source}: fairness"))
    )
    if args.fair_share is not None:
        fairness = dataclasses.replace(fairness, enabled=args.fair_share)
    return fairness


def _verify(config: dict[str, Any], source: str) -> VerifyConfig:
    """config.toml's [verify] table: spot checks and the reputation they feed."""
    table = config.get("verify")
    return (
        VerifyConfig()
        if table is None
        else VerifyConfig.from_table(Table(table, f"{source}: verify"))
    )


def node_config(args: argparse.Namespace) -> tuple[NodeConfig, str, str]:
    """The node's config: config.toml's values, with the flags given laid over them.

    Also the log level and format, which the file may set too.
    """
    path = args.config or args.data_dir.expanduser() / CONFIG_FILE
    file, source = read(path, required=args.config is not None)
    f = settings(file, source)
    forward_only = f.forward_only if args.no_models is None else args.no_models
    if forward_only and args.model:
        raise ConfigError("--no-models (or forward_only) and --model exclude each other")
    models = () if forward_only else _models(args, file, source)
    # Paths in the file are relative to the file (the data dir, usually), not to the cwd.
    here = path.parent
    swarm_key = args.swarm_key or (here / Path(f.swarm_key).expanduser() if f.swarm_key else None)
    config = NodeConfig(
        data_dir=args.data_dir.expanduser(),
        listen=tuple(args.listen or f.listen),
        peers=(*f.peers, *args.peer),
        models=models,
        max_queue=_given(args.max_queue, f.max_queue),
        shutdown_grace_s=_given(args.grace, f.grace),
        probe_cuda=_given(args.cuda_probe, f.cuda_probe),
        swarm_key=swarm_key_or_default(swarm_key, args.data_dir),
        bootstrap=(*f.bootstrap, *args.bootstrap),
        mdns=_given(args.mdns, f.mdns),
        dht=_given(args.dht, f.dht),
        relay_service=_relay(args, f, file, source),
        membership=_membership(
            _given(args.heartbeat, f.heartbeat), _given(args.dead_after, f.dead_after)
        ),
        router=_router(args, file, source),
        fairness=_fairness(args, file, source),
        reach=ReachConfig(
            mode=Mode(args.reachability or f.reachability),
            public_addrs=(*f.public_addrs, *args.public_addr),
        ),
        verify=_verify(file, source),
        content=ContentConfig(
            upload_rate=_given(args.upload_rate, f.upload_rate),
            max_uploads=_given(args.max_uploads, f.max_uploads),
            chunk_size=_given(args.chunk_size, f.chunk_size),
        ),
        allow=load_allow_list(
            [*f.allow, *args.allow],
            [*(here / Path(p).expanduser() for p in f.allow_file), *args.allow_file],
        ),
        http=_http(args, f),
        http_fallback=args.http is None and f.http_listen is None,
        grpc=_grpc(args, f),
        grpc_fallback=args.grpc is None and f.grpc_listen is None,
    )
    level = args.log_level or f.log_level or "INFO"
    return config, level, args.log_format or f.log_format


def _relay(
    args: argparse.Namespace, f: FileSettings, config: dict[str, Any], source: str
) -> RelayServiceConfig:
    """config.toml's [relay] limits; --relay-service (or node.relay_service) turns it on or off."""
    enabled = f.relay_service if args.relay_service is None else args.relay_service == "on"
    return RelayServiceConfig.from_table(
        Table(config.get("relay", {}), f"{source}: relay"), enabled=enabled
    )


def _given(flag: T | None, file_value: T) -> T:
    """The flag's value when it was given, else the file's (or its default)."""
    return file_value if flag is None else flag


def _http(args: argparse.Namespace, f: FileSettings) -> GatewayConfig | None:
    listen = args.http or f.http_listen or DEFAULT_HTTP
    token_env = args.http_token_env or f.http_token_env
    insecure = _given(args.http_insecure, f.http_insecure)
    if listen == HTTP_OFF:
        # The token env is the gRPC port's too, unless it names its own.
        grpc_uses_it = (args.grpc or f.grpc_listen) != HTTP_OFF and not _grpc_token_env(args, f)
        if (args.http_token_env and not grpc_uses_it) or args.http_insecure:
            raise ConfigError("--http-token-env and --http-insecure need the gateway on")
        return None
    return GatewayConfig.parse(listen, token_env=token_env, insecure=insecure)


def _grpc_token_env(args: argparse.Namespace, f: FileSettings) -> str | None:
    return args.grpc_token_env or f.grpc_token_env


def _grpc(args: argparse.Namespace, f: FileSettings) -> GrpcConfig | None:
    """The gRPC port: its own token env if it names one, else the HTTP gateway's."""
    listen = args.grpc or f.grpc_listen or DEFAULT_GRPC
    token_env = _grpc_token_env(args, f) or args.http_token_env or f.http_token_env
    insecure = _given(args.grpc_insecure, f.grpc_insecure)
    if listen == HTTP_OFF:
        if args.grpc_token_env or args.grpc_insecure:
            raise ConfigError("--grpc-token-env and --grpc-insecure need the gRPC port on")
        return None
    return GrpcConfig.parse(listen, token_env=token_env, insecure=insecure)


def swarm_key_or_default(path: Path | None, data_dir: Path) -> str | None:
    """The key at ``path``; with none given, DATA_DIR/swarm.key if it exists."""
    if path is None:
        path = data_dir.expanduser() / "swarm.key"
        if not path.exists():
            return None
    return load_swarm_key(path)


def _membership(heartbeat_s: float, dead_after_s: float) -> MembershipConfig:
    try:
        return MembershipConfig(heartbeat_s=heartbeat_s, dead_after_s=dead_after_s)
    except ConfigError as exc:
        raise ConfigError(f"heartbeat/dead_after: {exc}") from exc
