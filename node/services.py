"""The running node as one frozen record: every service the wiring built.

``node.daemon`` builds it once the host listens (and again, replaced, when the
gateway and the local socket are up); status views (``node.status``) are pure functions of it, so
nothing reads a half-built node: there is no attribute that is None until
serving and no assert that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bootstrap.dht import ModelDHT
from bootstrap.peerstore import PeerStore
from capabilities.hardware import Hardware
from node.config import NodeConfig
from node.content.service import ContentService
from node.gateway.grpc_server import GrpcGateway
from node.gateway.server import Gateway
from node.jobs.dispatch import Dispatcher, RouterPlanner
from node.jobs.inbound import InferHandler
from node.jobs.outbound import Caller
from node.jobs.router import Router
from node.jobs.service import InferenceService
from node.jobs.verify import Verifier
from node.membership.caps import CapsHandler, RecordSigner
from node.membership.peers import Membership
from node.models import ModelRegistry
from node.net.access import AccessPolicy
from node.net.local import LocalSocket
from node.observe.feed import Feed
from node.observe.metrics import NodeMetrics
from node.reach.circuits import Circuits
from node.reach.monitor import ReachMonitor
from node.reach.relay_service import RelayService
from node.reach.relays import Relays


@dataclass(frozen=True, slots=True)
class Services:
    config: NodeConfig
    peer_id: str
    addrs: tuple[str, ...]  # every address we listen on, with /p2p/<peer id> (this machine's use)
    host: Any  # the libp2p host
    hardware: Hardware
    models: ModelRegistry
    access: AccessPolicy
    feed: Feed
    service: InferenceService
    membership: Membership
    router: Router
    planner: RouterPlanner
    dispatcher: Dispatcher
    verifier: Verifier  # spot checks, verify: N, and the reputation they feed
    caller: Caller
    inbound: InferHandler
    caps: CapsHandler
    signer: RecordSigner
    metrics: NodeMetrics
    store: PeerStore
    relay: RelayService  # circuit relay v2: stop on every node, hop while public
    relays: Relays  # reservations on relays while not known to be public
    circuits: Circuits  # dials through relays, DCUtR, each connection's kind
    dht: ModelDHT | None  # None with --no-dht
    reach: ReachMonitor  # reachability, and the addresses records and the DHT announce
    content: ContentService  # what this node shares (/swarm/blob/1.0.0) and pulls
    gateway: Gateway | None = None  # set once the gateway listens; None with --http off
    grpc: GrpcGateway | None = None  # set once the gRPC port listens; None with --grpc off
    local: LocalSocket | None = None  # set once the local socket listens; None without one
