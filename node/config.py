"""A node's typed config: what ``swarm daemon``'s flags and config.toml become.

Parsed once at the top (``node.cli.config_file``) and passed down frozen; every
value is checked here or in the sub-config it belongs to, and a bad one is a
ConfigError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from node.content.config import ContentConfig
from node.data_dir import DEFAULT_DATA_DIR
from node.defaults import DEFAULT_LISTEN as DEFAULT_LISTEN  # its home before node.defaults
from node.gateway.config import GatewayConfig, GrpcConfig
from node.jobs.fairness import FairnessConfig
from node.jobs.router import RouterConfig
from node.jobs.verify import VerifyConfig
from node.membership.config import MembershipConfig
from node.reach.config import ReachConfig
from node.reach.relay_service import RelayServiceConfig
from node.reach.relays import RelaysConfig
from protocols import DEFAULT_LIMITS, Limits
from protocols.errors import ConfigError
from runners.catalog import DEFAULT_MODEL, ModelSpec


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    peers: tuple[str, ...] = ()
    models: tuple[str | ModelSpec, ...] = (DEFAULT_MODEL,)  # see runners.catalog
    max_queue: int = 64
    shutdown_grace_s: float = 10.0
    probe_cuda: bool = True
    limits: Limits = DEFAULT_LIMITS
    bootstrap: tuple[str, ...] = ()  # peers to join the swarm through (also DHT seeds)
    mdns: bool = True
    dht: bool = True
    relay_service: RelayServiceConfig = field(default_factory=RelayServiceConfig)
    relays: RelaysConfig = field(default_factory=RelaysConfig)  # reservations while NATed
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)  # sharing between peers
    reach: ReachConfig = field(default_factory=ReachConfig)  # publicly reachable, and how known
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # spot checks, reputation
    content: ContentConfig = field(default_factory=ContentConfig)  # sharing and pulling models
    swarm_key: str | None = None  # 64 hex digits: a private swarm
    allow: frozenset[str] | None = None  # peer ids allowed to use this node; None = all
    http: GatewayConfig | None = None  # the HTTP gateway (OpenAI, KServe v2); None = off
    # The gateway's port is the default one, not the user's: if another node on this
    # machine holds it, serve on a free port instead (an explicit busy port is an error).
    http_fallback: bool = False
    grpc: GrpcConfig | None = None  # the KServe v2 gRPC port; None = off
    grpc_fallback: bool = False  # as http_fallback, for the gRPC port

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ConfigError("max_queue must be >= 0")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown grace must be >= 0 seconds")
        if not self.listen:
            raise ConfigError("give at least one listen address")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"
