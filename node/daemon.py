"""The daemon: one node's lifetime, from identity to clean shutdown.

Start: identity from the data dir, the model registry loaded (the default model
is converted once and cached), hardware probed off the trio thread, host
listening, then ``_wire`` builds every service into one frozen ``Services``
record, and discovery, the gateway and the local socket (``node.net.local``, for
the CLI of this machine) start. Stop (``Node.stop``, wired to
SIGINT/SIGTERM by the CLI): new work is refused, work in flight gets the grace
period, what is left is cut off with a typed error, then the host is closed with
its listener and every runner built is closed. Every task lives in this nursery
and ends with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import trio
from libp2p.custom_types import TProtocol
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from bootstrap.addrs import dialable_addrs, peer_info
from bootstrap.dht import ModelDHT
from bootstrap.dialer import BootstrapDialer
from bootstrap.mdns import MdnsDiscovery, service_type_for
from bootstrap.peerstore import PeerStore
from bootstrap.roster import ROSTER_KEY, run_roster
from bootstrap.table import content_providers, live_peers
from capabilities.hardware import Hardware, probe
from node import status
from node.config import NodeConfig
from node.content.blob import BLOB_PROTOCOL
from node.content.service import ContentService
from node.data_dir import CLIENT_KEY, IDENTITY_KEY, SOCKET_FILE, remove_state, write_state
from node.errors import NodeError, sole_error
from node.gateway.app import Backend, swarm_models
from node.gateway.config import GatewayConfig, GrpcConfig
from node.gateway.grpc_server import GrpcGateway
from node.gateway.server import Gateway
from node.jobs.dispatch import Dispatcher, RouterPlanner
from node.jobs.inbound import InferHandler
from node.jobs.outbound import Caller
from node.jobs.reputation import Reputation, ReputationFile
from node.jobs.router import Router
from node.jobs.service import InferenceService
from node.jobs.verify import Verifier
from node.membership.caps import CapsHandler, Received, RecordSigner, answer_client
from node.membership.peers import Membership
from node.models import ModelRegistry
from node.net import local
from node.net.access import AccessPolicy
from node.net.frames import SocketFramed
from node.net.host import check_listen, load_or_create_identity, peer_id_of, running_host
from node.observe.feed import Feed, report_load, watch_peers
from node.observe.metrics import NodeMetrics
from node.reach.circuits import Circuits
from node.reach.monitor import ReachMonitor
from node.reach.records import relay_candidates
from node.reach.relay_service import RelayService
from node.reach.relays import Relays
from node.services import Services
from protocols import CAPS_PROTOCOL, INFER_PROTOCOL, MAX_HOPS, CapabilityRecord, Request, Result
from protocols.content import cid_text, parse_cid
from protocols.errors import ConfigError, SwarmError
from runners.base import CONTENT_DIR, Runner

log = logging.getLogger(__name__)

PEER_LINK_WAIT_S = 5.0
DHT_FIND_S = 5.0  # one DHT lookup of a content's providers
ANSWER_WAIT_S = 3.0


class NotServing(NodeError):
    """The node's services were asked for before it serves (or after it stopped)."""


class Node:
    def __init__(self, config: NodeConfig, *, runners: Sequence[Runner] = ()) -> None:
        """``runners``: models built in code (a Runner subclass of one's own), served
        beside those the config declares; the node loads and closes them."""
        self.config = config
        self.models = ModelRegistry(config.models, config.models_dir, extra=runners)
        self.feed = Feed()  # live events: peers, jobs, load (WebSocket subscribers, the page)
        self.access = AccessPolicy(config.allow)
        self._services: Services | None = None  # kept after stop: what ran, for reading
        self._serving = False
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._client_id = ""  # this data dir's CLI identity: one of the node's own clients

    @property
    def services(self) -> Services:
        """The node's services (still readable after it stopped); NotServing before
        ``run`` has started them."""
        if self._services is None:
            raise NotServing("the node has not started")
        return self._services

    @property
    def serving(self) -> bool:
        """Whether the services are up (from wiring to the host's close)."""
        return self._serving

    @property
    def peer_id(self) -> str:
        return self.services.peer_id

    @property
    def addrs(self) -> tuple[str, ...]:
        return self.services.addrs

    @property
    def gateway(self) -> Gateway | None:
        return self.services.gateway

    def status(self) -> dict[str, Any]:
        """What ``swarm status --json`` shows of this node."""
        return status.status(self.services)

    def stop(self) -> None:
        """Begin a graceful shutdown; ``run`` returns when it is complete."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pair = load_or_create_identity(cfg.data_dir / IDENTITY_KEY)
        check_listen(cfg.listen)  # a held port fails the start now, not after model loads
        try:
            await self.models.load_all()
            hardware = await trio.to_thread.run_sync(lambda: probe(cuda=cfg.probe_cuda))
            async with running_host(key_pair, cfg.listen, psk=cfg.swarm_key) as host:
                caller = Caller(host, limits=cfg.limits)
                try:
                    self._services = self._wire(host, key_pair, hardware, caller)
                    self._serving = True
                    await self._serve(task_status)
                finally:
                    self._serving = False
                    with trio.CancelScope(shield=True):
                        await caller.close()
        finally:
            await self.models.close()
            remove_state(cfg.data_dir)
            log.info("node stopped")

    # -- models on request ------------------------------------------------------------

    async def load_model(self, name: str) -> dict[str, Any]:
        """Load a model this node's config declares but does not serve now.

        Only declared models: a peer or an HTTP client can never make a node load
        an arbitrary path. Raises ModelNotFound for an undeclared name, and the
        runner's error when it does not load (also kept for ``swarm status``).
        """
        s = self.services
        runner, change = await self.models.load(name)
        if runner is None:
            return change.describe()
        cid = await s.content.share_model(runner)
        s.service.add_runner(runner, self.config.max_queue)
        if s.dht is not None and self._nursery is not None:
            # Announce it now, not at the next reprovide: peers that look it up
            # in the DHT should find this node from now on.
            self._nursery.start_soon(s.dht.provide, runner.info.name)
            if cid is not None:
                self._nursery.start_soon(s.dht.provide_key, parse_cid(cid), cid)
        log.info("model %s loaded on request", runner.info.name)
        return change.describe()

    async def unload_model(self, name: str) -> dict[str, Any]:
        """Stop serving a model: new jobs for it go to peers; admitted ones finish
        (within the shutdown grace); then its runner is closed."""
        s = self.services
        if self.models.find(name) is None and name.lower() in self.models.declared():
            return {"model": name, "state": "unloaded", "changed": False}
        runner = self.models.take(name)  # ModelNotFound when not served here
        found = runner.info.name
        if s.dht is not None:
            s.dht.stop_providing(found)
        s.content.unshare_model(found)
        await s.service.remove_runner(found, self.config.shutdown_grace_s)
        with trio.CancelScope(shield=True):
            await runner.close()
        log.info("model %s unloaded on request", found)
        return {"model": found, "state": "unloaded", "changed": True}

    # -- wiring -------------------------------------------------------------------------

    def _wire(self, host: Any, key_pair: Any, hardware: Hardware, caller: Caller) -> Services:
        """Every service of the running node, connected, as one record.

        The callbacks handed out here (record bodies, load, metrics, the caps
        answer) read ``self.services``, the record this returns; none runs before
        it is in place, because the host serves no protocol of ours until the
        handlers set below exist and discovery starts after.
        """
        cfg = self.config
        peer_id = host.get_id().to_base58()
        self._client_id = peer_id_of(load_or_create_identity(cfg.data_dir / CLIENT_KEY))
        signer = RecordSigner(key_pair, lambda: status.describe(self.services))
        # The relay work follows reachability's verdict (the monitor, built below).
        relay = RelayService(
            host,
            cfg.relay_service,
            is_public=lambda: reach.is_public(),
            member=self.access.member,
        )
        circuits = Circuits(
            host,
            relay.protocol,
            guesses=lambda peer: status.relays_holding(self.services, peer),
        )
        relay.protocol.on_relayed = circuits.on_relayed
        circuits.on_direct = caller.drop_idle  # pooled streams move off the relay
        relays = Relays(
            host,
            cfg.relays,
            is_public=lambda: reach.is_public(),
            candidates=lambda: relay_candidates(membership.table),
        )
        membership = Membership(
            host,
            signer,
            lambda: self.services.service.load().describe(),
            cfg.membership,
            access=self.access,
            connect=circuits.connect,
        )
        circuits.on_reconnected = membership.link  # swap records at once: linked again
        membership.relays_held = relays.held  # links the planner keeps first
        membership.reserved_here = relay.protocol.reserved
        router = Router(peer_id, cfg.router, rng=random.Random(), clock=trio.current_time)
        # What this node found of its peers' answers, as it was when it last stopped.
        reputation_file = ReputationFile.in_data_dir(cfg.data_dir)
        reputation = Reputation(cfg.verify.policy, time.time, reputation_file.load())
        planner = RouterPlanner(
            router,
            lambda: membership.table,
            lambda: status.local_node(self.services),
            lambda: self.services.dispatcher.in_flight,
            held_back=reputation.held_back,
            paths=circuits.kinds,  # direct, hole-punched or relayed, per connected peer
            calls=lambda: self.services.dispatcher.calls,
            unlinked=membership.unlinked_providers,
        )
        dispatcher = Dispatcher(
            peer_id,
            membership,
            caller,
            planner,
            max_attempts=cfg.router.max_attempts,
            max_resumes=cfg.router.max_resumes,
            hedge_ms=cfg.router.hedge_ms,
        )
        service = InferenceService(
            self.models.runners,
            node_id=peer_id,
            max_queue=cfg.max_queue,
            forwarder=dispatcher,
            fairness=cfg.fairness,
            own_clients=(self._client_id,),
        )
        verifier = Verifier(
            cfg.verify,
            peer_id,
            reputation,
            _Nodes(self),
            plan=planner.plan,
            attempt=dispatcher.attempt,
            run_here=self._run_here,
            rng=random.Random(cfg.verify.seed),
            store=reputation_file,
            max_attempts=cfg.router.max_attempts,
        )
        dispatcher.verifier = verifier
        metrics = NodeMetrics(peer_id, lambda: status.live_figures(self.services))
        feed = self.feed

        def observe(request: Request, outcome: str, seconds: float, by: str | None) -> None:
            metrics.observe(request, outcome, seconds, by)
            feed.job_finished(request, outcome, seconds, by)

        service.observer = observe
        service.on_start = feed.job_started
        inbound = InferHandler(service, limits=cfg.limits, access=self.access)
        inbound.on_request = membership.note_caller
        host.set_stream_handler(TProtocol(INFER_PROTOCOL), inbound)

        def answer(received: Received) -> CapabilityRecord:
            if received.is_client:
                return signer.view(status.client_view(self.services))
            return membership.answer(received)

        caps = CapsHandler(membership.on_inbound, answer, self.access)
        host.set_stream_handler(TProtocol(CAPS_PROTOCOL), caps)
        store = PeerStore.in_data_dir(cfg.data_dir)

        def verified(pid: str, addrs: tuple[str, ...]) -> None:
            self._remember(store, pid, addrs)
            # A relay's record names who holds a reservation there: those we have not
            # linked are reachable through it now (of each pair, the lower id dials).
            for other in status.reserved_at(self.services, pid):
                if other > peer_id:
                    membership.relink(other)

        membership.on_verified = verified
        reach = ReachMonitor(
            host,
            cfg.reach,
            peers=lambda: [p.peer_id for p in live_peers(membership.table)],
            wait_changed=membership.wait_changed,
            circuit_addrs=relays.circuit_addrs,
            relays_held=relays.held,
            relay_entry=relay.record_entry,
            psk=cfg.swarm_key,
            access=self.access,
        )
        dht = ModelDHT(host, membership.events.clone(), announce=reach.wide) if cfg.dht else None
        if dht is not None:
            membership.finder = dht.find_providers
            reach.on_change = dht.reannounce

        async def find_content(content_id: bytes) -> list[str]:
            text = cid_text(content_id)
            found = [p.peer_id for p in content_providers(membership.table, text)]
            if dht is not None:
                hints = await dht.find_key_providers(content_id, text, DHT_FIND_S)
                found += [h.peer_id for h in hints]
            return list(dict.fromkeys(found))

        content = ContentService(
            host,
            cfg.content,
            content_dir=cfg.data_dir / CONTENT_DIR,
            root=cfg.models_dir / CONTENT_DIR,
            access=self.access,
            find=find_content,
        )
        host.set_stream_handler(BLOB_PROTOCOL, content.server)
        return Services(
            config=cfg,
            peer_id=peer_id,
            addrs=tuple(dialable_addrs(host)),
            host=host,
            hardware=hardware,
            models=self.models,
            access=self.access,
            feed=feed,
            service=service,
            membership=membership,
            router=router,
            planner=planner,
            dispatcher=dispatcher,
            verifier=verifier,
            caller=caller,
            inbound=inbound,
            caps=caps,
            signer=signer,
            metrics=metrics,
            store=store,
            relay=relay,
            relays=relays,
            circuits=circuits,
            dht=dht,
            reach=reach,
            content=content,
        )

    async def _run_here(self, request: Request) -> Result:
        """Run ``request`` on this node's own runner (a spot check's second run): as
        a request that has come its last hop, it is never forwarded."""
        return await self.services.service.execute(replace(request, hops=MAX_HOPS), _no_chunks)

    async def _serve(self, task_status: TaskStatus[Node]) -> None:
        cfg, s = self.config, self.services
        # Before the first record goes out: it names each served model's content id.
        for runner in list(s.models.runners.values()):
            await s.content.share_model(runner)
        await s.content.share_declared()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(s.relay.run)
                await nursery.start(s.circuits.run)
                await nursery.start(s.membership.run)
                await nursery.start(s.reach.run)
                await nursery.start(s.verifier.run)
                await nursery.start(s.relays.run)
                table = lambda: s.membership.table  # noqa: E731 (read at each use: it is replaced)
                nursery.start_soon(watch_peers, s.feed, table, s.membership.wait_changed)
                own_load = lambda: s.service.load().describe()  # noqa: E731
                nursery.start_soon(report_load, s.feed, s.peer_id, own_load, table)
                await self._start_discovery(nursery, s)
                await self._wait_for_configured_peers(s.membership)
                if cfg.http is not None:
                    gateway = await self._start_gateway(nursery, cfg.http)
                    self._services = s = dataclasses.replace(s, gateway=gateway)
                if cfg.grpc is not None:
                    grpc = await self._start_grpc(nursery, cfg.grpc)
                    self._services = s = dataclasses.replace(s, grpc=grpc)
                if (listening := await self._start_local_socket(nursery, s)) is not None:
                    self._services = s = dataclasses.replace(s, local=listening)
                write_state(cfg.data_dir, status.daemon_state(s, os.getpid()))
                log.info("node %s ready on %s", s.peer_id, ", ".join(s.addrs))
                task_status.started(self)
                for name, cid in s.models.pending.items():
                    nursery.start_soon(self._pull_and_load, name, cid)
                await self._stop.wait()
                log.info("shutting down: draining for up to %.1f s", cfg.shutdown_grace_s)
                await s.service.drain(cfg.shutdown_grace_s)
                with trio.move_on_after(ANSWER_WAIT_S):  # let cut-off work send its errors
                    await s.inbound.wait_answered()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None  # handlers still running during the host's close spawn nothing

    async def _pull_and_load(self, name: str, cid: str) -> None:
        """A ``content=ID`` model whose files are not here: pulled from the peers that
        share it, then loaded as if converted here (and shared on in turn)."""
        try:
            await self.services.content.pull(parse_cid(cid))
            await self.load_model(name)
        except SwarmError as exc:
            log.error("model %s (content %s) not served: %s", name, cid, exc)
            self.models.failed[name] = str(exc)

    # -- discovery ----------------------------------------------------------------------

    async def _start_discovery(self, nursery: trio.Nursery, s: Services) -> None:
        cfg = self.config
        nursery.start_soon(self._redial_remembered, s)
        dial = (*cfg.peers, *cfg.bootstrap)
        if dial:
            dialer = BootstrapDialer(s.host, dial, s.membership.events.clone())
            await nursery.start(dialer.run)
        if cfg.mdns:
            mdns = MdnsDiscovery.for_host(
                s.host, s.membership.events.clone(), service_type=service_type_for(cfg.swarm_key)
            )
            await nursery.start(mdns.run)
        if s.dht is not None:
            await nursery.start(s.dht.run)
            for name in (*s.models.runners, ROSTER_KEY):
                nursery.start_soon(s.dht.provide, name)
            for content_id in s.content.shares.ids():
                nursery.start_soon(s.dht.provide_key, content_id, cid_text(content_id))
            nursery.start_soon(run_roster, s.dht, s.peer_id, lambda: s.membership.table.peers)

    async def _redial_remembered(self, s: Services) -> None:
        """Hint the peers of earlier runs to membership, most recently seen first.

        Through the bounded discovery channel with backpressure: a node may
        remember far more peers (up to the peerstore's cap) than the channel
        holds, and each hint waits for room instead of failing the start.
        """
        async with s.membership.events.clone() as events:
            for known in await s.store.known_peers():
                await events.send(known)

    async def _wait_for_configured_peers(self, membership: Membership) -> None:
        """Ready means the peers we were told to dial have answered (or the wait ended)."""
        cfg = self.config
        wanted = {str(peer_info(a).peer_id) for a in (*cfg.peers, *cfg.bootstrap)}
        wanted.discard(self.services.peer_id)
        with trio.move_on_after(PEER_LINK_WAIT_S):
            while not wanted <= {p.peer_id for p in live_peers(membership.table)}:
                await membership.wait_changed()

    def _remember(self, store: PeerStore, peer_id: str, addrs: tuple[str, ...]) -> None:
        if self._nursery is not None and addrs:
            # An inbound record can land while the nursery closes; then it is not saved.
            with contextlib.suppress(RuntimeError):
                self._nursery.start_soon(store.remember, peer_id, addrs)

    # -- local socket -------------------------------------------------------------------

    async def _start_local_socket(
        self, nursery: trio.Nursery, s: Services
    ) -> local.LocalSocket | None:
        """The data dir's socket for this machine's CLI (node.net.local): jobs and the
        client view, each connection taken for the data dir's client identity."""
        client_id = self._client_id

        async def infer(stream: SocketFramed, peer_id: str) -> None:
            await s.inbound.serve(stream, peer_id, idle_timeout_s=local.IDLE_TIMEOUT_S)

        async def view(stream: SocketFramed, peer_id: str) -> None:
            client_view = lambda: s.signer.view(status.client_view(self.services))  # noqa: E731
            await answer_client(stream, peer_id, self.access, client_view)

        path, handlers = self.config.data_dir / SOCKET_FILE, {"infer": infer, "view": view}
        served = local.LocalSocket(path, handlers, peer_id=client_id, limits=self.config.limits)
        return served if await nursery.start(served.run) is not None else None

    # -- gateway ------------------------------------------------------------------------

    async def _start_gateway(self, nursery: trio.Nursery, config: GatewayConfig) -> Gateway:
        """Serve the gateway; a busy port is a ConfigError unless the fallback applies."""
        return await _start_with_fallback(
            nursery, self._gateway, config, self.config.http_fallback, "HTTP gateway", "--http"
        )

    async def _start_grpc(self, nursery: trio.Nursery, config: GrpcConfig) -> GrpcGateway:
        """Serve the KServe v2 gRPC port, with the HTTP gateway's busy-port rule; its
        messages are bounded by the node's limits too."""
        limit = min(config.max_message, self.config.limits.max_message)
        config = dataclasses.replace(config, max_message=limit)
        grace = self.config.shutdown_grace_s + ANSWER_WAIT_S

        def grpc(config: GrpcConfig) -> GrpcGateway:
            return GrpcGateway(self._backend(), config, shutdown=self._stop.wait, grace_s=grace)

        return await _start_with_fallback(
            nursery, grpc, config, self.config.grpc_fallback, "gRPC port", "--grpc"
        )

    def _gateway(self, config: GatewayConfig) -> Gateway:
        """The HTTP gateway: its requests run through the service like any client's."""
        grace = self.config.shutdown_grace_s + ANSWER_WAIT_S
        return Gateway(self._backend(), config, shutdown=self._stop.wait, grace_s=grace)

    def _backend(self) -> Backend:
        """What the gateway and the gRPC port see of this node: their requests run
        through the service like any client's, held against ``GATEWAY`` (the node's own
        clients) in the fair-share ledger."""
        s = self.services
        return Backend(
            execute=s.service.execute,
            models=lambda: swarm_models(s.models.infos(), s.membership.table),
            status=self.status,
            metrics=s.metrics.render,
            load_model=self.load_model,
            unload_model=self.unload_model,
            feed=s.feed,
            table=lambda: s.membership.table,
            backends=lambda: status.backends_view(self.services),
            select_peer=lambda model, strategy, priority: status.select_peer(
                self.services, model, strategy, priority
            ),
        )


class _Listener(Protocol):
    async def run(self, *, task_status: TaskStatus[str] = ...) -> None: ...


L = TypeVar("L", bound=_Listener)
C = TypeVar("C", GatewayConfig, GrpcConfig)


async def _start_with_fallback(
    nursery: trio.Nursery,
    make: Callable[[C], L],
    config: C,
    fallback: bool,
    what: str,
    flag: str,
) -> L:
    """``make(config)`` serving in ``nursery``. A busy port is a ConfigError unless
    ``fallback`` (the port is the default one, not the user's): then a free one."""
    listener = make(config)
    try:
        await nursery.start(listener.run)
        return listener
    except BaseException as raised:  # a group from the listener's nursery, or its OSError
        exc = sole_error(raised)
        if not (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE):
            raise
    where = f"{config.host}:{config.port}"
    if not fallback:
        raise ConfigError(f"{what}: {where} is in use ({flag} HOST:PORT or off)")
    log.warning("%s: %s is in use (another node?); taking a free port", what, where)
    listener = make(dataclasses.replace(config, port=0))
    await nursery.start(listener.run)
    return listener


class _Nodes:
    """How each node announces a model, read off the running services (verification)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def entry(self, node: str, model: str) -> Mapping[str, Any] | None:
        return status.model_entry(self._node.services, node, model)

    def serves_here(self, model: str) -> bool:
        return model.lower() in self._node.services.service.runners


async def _no_chunks(chunk: Mapping[str, Any]) -> None:
    """A spot check does not stream."""
