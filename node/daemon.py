"""The daemon: one node's lifetime, from identity to clean shutdown.

Start: identity from the data dir, runners loaded (the default model is
converted once and cached), hardware probed off the trio thread, host
listening, handlers set, configured peers dialled. Stop (``Node.stop``, wired
to SIGINT/SIGTERM by the CLI): new work is refused, work in flight gets the
grace period, what is left is cut off with a typed error, then the host is
closed with its listener. Every task lives in this nursery and ends with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from bootstrap.addrs import dialable_addrs, peer_info
from bootstrap.dht import ModelDHT
from bootstrap.dialer import BootstrapDialer
from bootstrap.mdns import MdnsDiscovery, service_type_for
from bootstrap.peerstore import PeerStore
from bootstrap.table import live_peers
from capabilities.hardware import Hardware, probe
from capabilities.record import record_body
from node.errors import sole_error
from node.gateway import Backend, Gateway, GatewayConfig, swarm_models
from node.jobs.dispatch import Dispatcher, RouterPlanner
from node.jobs.inbound import InferHandler
from node.jobs.outbound import Caller
from node.jobs.router import Candidate, LocalNode, Router, RouterConfig
from node.jobs.service import InferenceService
from node.json_values import jsonable
from node.membership.caps import CapsHandler, Received, RecordSigner
from node.membership.peers import Membership, MembershipConfig
from node.net.access import AccessPolicy
from node.net.host import load_or_create_identity, running_host
from node.observe.feed import Feed, report_load, watch_peers
from node.observe.metrics import NodeMetrics
from protocols import (
    CAPS_PROTOCOL,
    DEFAULT_LIMITS,
    INFER_PROTOCOL,
    CapabilityRecord,
    Limits,
    Priority,
    Request,
    SwarmError,
)
from protocols.errors import ConfigError
from runners.base import Runner
from runners.catalog import DEFAULT_MODEL, ModelSpec, build_runner, parse_model_spec
from runners.errors import ModelNotFound

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("~/.swarm").expanduser()
DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/7420"
STATE_FILE = "daemon.json"
PEER_LINK_WAIT_S = 5.0
ANSWER_WAIT_S = 3.0
ROSTER_KEY = "swarm/members/v1"  # a DHT key every member provides (not a model name)
ROSTER_LOOKUP_S = 5.0
ROSTER_FIRST_S = 1.0
ROSTER_ASK = 3  # closest peers asked per roster lookup; each answers with every member it holds
ROSTER_EVERY_S = 15.0  # at most this long between lookups that find new members
ROSTER_MAX_S = 480.0  # lookups that find nobody new back off to this


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
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    swarm_key: str | None = None  # 64 hex digits: a private swarm
    allow: frozenset[str] | None = None  # peer ids allowed to use this node; None = all
    http: GatewayConfig | None = None  # the HTTP gateway (OpenAI, KServe v2); None = off
    # The gateway's port is the default one, not the user's: if another node on this
    # machine holds it, serve on a free port instead (an explicit busy port is an error).
    http_fallback: bool = False

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


class Node:
    def __init__(self, config: NodeConfig, *, runners: Sequence[Runner] = ()) -> None:
        """``runners``: models built in code (a Runner subclass of one's own), served
        beside those the config declares; the node loads and closes them."""
        self.config = config
        self._extra_runners = tuple(runners)
        self.host: Any = None  # the libp2p host, while the node runs
        self.peer_id = ""
        self.addrs: list[str] = []
        self.service: InferenceService | None = None
        self.membership: Membership | None = None
        self.dispatcher: Dispatcher | None = None
        self.router: Router | None = None
        self._planner: RouterPlanner | None = None
        self.metrics: NodeMetrics | None = None
        self._nursery: trio.Nursery | None = None
        self._key_pair: Any = None
        self.failed_models: dict[str, str] = {}  # name -> why it did not load
        self._caps: CapsHandler | None = None
        self._signer: RecordSigner | None = None
        self.gateway: Gateway | None = None
        self.dht: ModelDHT | None = None  # set while the DHT runs
        self.feed = Feed()  # live events: peers, jobs, load (WebSocket subscribers, the page)
        self.hardware: Hardware | None = None
        self._runners: dict[str, Runner] = {}
        self._stop = trio.Event()
        self.access = AccessPolicy(config.allow)

    def stop(self) -> None:
        """Begin a graceful shutdown; ``run`` returns when it is complete."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pair = self._key_pair = load_or_create_identity(cfg.data_dir / "identity.key")
        try:
            await self._load_runners()
            self.hardware = await trio.to_thread.run_sync(lambda: probe(cuda=cfg.probe_cuda))
            async with running_host(key_pair, cfg.listen, psk=cfg.swarm_key) as host:
                await self._serve(host, task_status)
        finally:
            with trio.CancelScope(shield=True):
                for runner in self._runners.values():
                    await runner.close()
                (cfg.data_dir / STATE_FILE).unlink(missing_ok=True)
            log.info("node stopped")

    async def load_model(self, name: str) -> dict[str, Any]:
        """Load a model this node's config declares but does not serve now.

        Only declared models: a peer or an HTTP client can never make a node load
        an arbitrary path. Raises ModelNotFound for an undeclared name, and the
        runner's error when it does not load (also kept for ``swarm status``).
        """
        spec = self._declared().get(name.lower())
        if spec is None:
            declared = sorted(s.name for s in self._declared().values())
            raise ModelNotFound(
                f"{name!r} is not declared in this node's config; declared: {declared}"
            )
        if spec.name in self._runners:
            return {"model": spec.name, "state": "loaded", "changed": False}
        assert self.service is not None  # set before serving
        runner = build_runner(spec, self.config.models_dir)
        try:
            await runner.load()
        except SwarmError as exc:
            self.failed_models[spec.name] = str(exc)
            raise
        self.failed_models.pop(spec.name, None)
        self._runners[runner.info.name] = runner
        self.service.add_runner(runner, self.config.max_queue)
        if self.dht is not None and self._nursery is not None:
            # Announce it now, not at the next reprovide: peers that look it up
            # in the DHT should find this node from now on.
            self._nursery.start_soon(self.dht.provide, runner.info.name)
        log.info("model %s loaded on request", runner.info.name)
        return {"model": runner.info.name, "state": "loaded", "changed": True}

    async def unload_model(self, name: str) -> dict[str, Any]:
        """Stop serving a model: new jobs for it go to peers; admitted ones finish
        (within the shutdown grace); then its runner is closed."""
        found = next((n for n in self._runners if n.lower() == name.lower()), None)
        if found is None:
            if name.lower() in self._declared():
                return {"model": name, "state": "unloaded", "changed": False}
            raise ModelNotFound(f"this node does not serve {name!r}")
        assert self.service is not None  # set before serving
        runner = self._runners.pop(found)
        if self.dht is not None:
            self.dht.stop_providing(found)
        await self.service.remove_runner(found, self.config.shutdown_grace_s)
        with trio.CancelScope(shield=True):
            await runner.close()
        log.info("model %s unloaded on request", found)
        return {"model": found, "state": "unloaded", "changed": True}

    def _declared(self) -> dict[str, ModelSpec]:
        specs = (s if isinstance(s, ModelSpec) else parse_model_spec(s) for s in self.config.models)
        return {s.name.lower(): s for s in specs}

    async def _load_runners(self) -> None:
        """Build and load every declared model, at once.

        A model that fails to load (a file that does not convert, a backend that
        does not answer, a device that is absent) is left out with its reason,
        shown in ``swarm status``; the node serves the others.
        """
        runners = [build_runner(spec, self.config.models_dir) for spec in self.config.models]
        runners += self._extra_runners
        names = [r.info.name.lower() for r in runners]
        if len(set(names)) != len(names):
            raise ConfigError(f"a model is configured twice: {names}")
        loaded: list[Runner] = []

        async def load(runner: Runner) -> None:
            try:
                await runner.load()
            except SwarmError as exc:
                log.error("model %s did not load: %s", runner.info.name, exc)
                self.failed_models[runner.info.name] = str(exc)
            else:
                loaded.append(runner)

        async with trio.open_nursery() as nursery:
            for runner in runners:
                nursery.start_soon(load, runner)
        self._runners = {r.info.name: r for r in runners if r in loaded}

    async def _serve(self, host: Any, task_status: TaskStatus[Node]) -> None:
        cfg = self.config
        self.host = host
        self.peer_id = host.get_id().to_base58()
        caller = Caller(host, limits=cfg.limits)
        signer = self._signer = RecordSigner(self._key_pair, self.describe)
        membership = Membership(host, signer, self._load, cfg.membership, access=self.access)
        self.membership = membership
        router = Router(self.peer_id, cfg.router, rng=random.Random(), clock=trio.current_time)
        planner = self._planner = RouterPlanner(
            router, lambda: membership.table, self._local_node, lambda: dispatcher.in_flight
        )
        dispatcher = Dispatcher(
            self.peer_id, membership, caller, planner, max_attempts=cfg.router.max_attempts
        )
        self.dispatcher = dispatcher
        self.router = router
        service = InferenceService(
            self._runners, node_id=self.peer_id, max_queue=cfg.max_queue, forwarder=dispatcher
        )
        self.service = service
        self.metrics = NodeMetrics(self)
        feed, metrics = self.feed, self.metrics

        def observe(request: Request, outcome: str, seconds: float, by: str | None) -> None:
            metrics.observe(request, outcome, seconds, by)
            feed.job_finished(request, outcome, seconds, by)

        service.observer = observe
        service.on_start = feed.job_started
        handler = InferHandler(service, limits=cfg.limits, access=self.access)
        host.set_stream_handler(TProtocol(INFER_PROTOCOL), handler)
        caps = CapsHandler(membership.on_inbound, self._answer(signer), self.access)
        self._caps = caps
        host.set_stream_handler(TProtocol(CAPS_PROTOCOL), caps)
        store = PeerStore.in_data_dir(cfg.data_dir)
        membership.on_verified = lambda pid, addrs: self._remember(store, pid, addrs)
        self.addrs = dialable_addrs(host)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(membership.run)
                table = lambda: membership.table  # noqa: E731 (read at each use: it is replaced)
                nursery.start_soon(watch_peers, feed, table, membership.wait_changed)
                own_load = lambda: service.load().describe()  # noqa: E731
                nursery.start_soon(report_load, feed, self.peer_id, own_load, table)
                await self._start_discovery(nursery, host, membership, store)
                await self._wait_for_configured_peers(membership)
                if cfg.http is not None:
                    await self._start_gateway(nursery, cfg.http)
                self._write_state()
                log.info("node %s ready on %s", self.peer_id, ", ".join(self.addrs))
                task_status.started(self)
                await self._stop.wait()
                log.info("shutting down: draining for up to %.1f s", cfg.shutdown_grace_s)
                await service.drain(cfg.shutdown_grace_s)
                with trio.move_on_after(ANSWER_WAIT_S):  # let cut-off work send its errors
                    await handler.wait_answered()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None  # handlers still running during the host's close spawn nothing
            with trio.CancelScope(shield=True):
                await caller.close()

    async def _start_discovery(
        self, nursery: trio.Nursery, host: Any, membership: Membership, store: PeerStore
    ) -> None:
        cfg = self.config
        for known in await store.known_peers():  # redial peers of earlier runs first
            membership.events.send_nowait(known)
        dial = (*cfg.peers, *cfg.bootstrap)
        if dial:
            dialer = BootstrapDialer(host, dial, membership.events.clone())
            await nursery.start(dialer.run)
        if cfg.mdns:
            mdns = MdnsDiscovery.for_host(
                host, membership.events.clone(), service_type=service_type_for(cfg.swarm_key)
            )
            await nursery.start(mdns.run)
        if cfg.dht:
            dht = ModelDHT(host, membership.events.clone())
            await nursery.start(dht.run)
            self.dht = dht
            membership.finder = dht.find_providers
            for name in (*self._runners, ROSTER_KEY):
                nursery.start_soon(dht.provide, name)
            nursery.start_soon(self._roster, dht)

    async def _roster(self, dht: ModelDHT) -> None:
        """Find the other members through the DHT, so a node that joined through one
        bootstrap peer comes to know the whole swarm, not only the peers it asked for.

        Every member provides one well-known key; its providers (the DHT's answer is
        capped at about 20 per lookup) arrive as Discovered hints and get linked.
        Lookups come soon after joining, then ever more rarely while they find
        nobody new: one costs kilobytes (every provider with its addresses), a node
        that joins later links to us itself, and linked peers name the peers they
        know in their records (see ``Membership.peer_sample``).
        """
        assert self.membership is not None  # set before discovery starts
        pause, seen = ROSTER_FIRST_S, set[str]()
        while True:
            await trio.sleep(pause * random.uniform(0.8, 1.2))
            hints = await dht.find_providers(ROSTER_KEY, ROSTER_LOOKUP_S, ask=ROSTER_ASK)
            found = {h.peer_id for h in hints}
            found -= set(self.membership.table.peers) | seen | {self.peer_id}
            seen |= found
            # Hold the pace while lookups bring news; else back off fast (x4): peer samples
            # in records carry most news once a node has joined.
            pause = min(pause, ROSTER_EVERY_S) if found else min(pause * 4, ROSTER_MAX_S)

    async def _wait_for_configured_peers(self, membership: Membership) -> None:
        """Ready means the peers we were told to dial have answered (or the wait ended)."""
        wanted = {str(peer_info(a).peer_id) for a in (*self.config.peers, *self.config.bootstrap)}
        wanted.discard(self.peer_id)
        with trio.move_on_after(PEER_LINK_WAIT_S):
            while not wanted <= {p.peer_id for p in live_peers(membership.table)}:
                await membership.wait_changed()

    def _remember(self, store: PeerStore, peer_id: str, addrs: tuple[str, ...]) -> None:
        if self._nursery is not None and addrs:
            # An inbound record can land while the nursery closes; then it is not saved.
            with contextlib.suppress(RuntimeError):
                self._nursery.start_soon(store.remember, peer_id, addrs)

    def _load(self) -> dict[str, Any]:
        assert self.service is not None  # set before serving
        return self.service.load().describe()

    def _answer(self, signer: RecordSigner) -> Callable[[Received], CapabilityRecord]:
        def answer(received: Received) -> CapabilityRecord:
            assert self.membership and self.service and self._caps  # set before serving
            if received.is_client:
                return signer.view(self._client_view())
            return self.membership.answer(received)

        return answer

    def _client_view(self) -> dict[str, Any]:
        """This node's own view, which clients (``swarm status``) get in its record."""
        assert self.membership and self.service and self._caps  # set before serving
        return {
            **self.membership.view(),
            "stats": self.service.stats.describe(),
            # Records that failed verification on arrival, before any table saw them.
            "records_refused_on_arrival": self._caps.refused_records,
            "caps": {"streams_in": self._caps.streams, "records_in": self._caps.exchanges},
            "runners": self.runner_status(),
            "routing": self._routing_view(),
            "models_failed": dict(self.failed_models),
            "access": {
                "private_swarm": self.config.swarm_key is not None,
                "allow_list": self.access.allowed is not None,
                "refused": self.access.refused,
            },
        }

    def status(self) -> dict[str, Any]:
        """What ``swarm status --json`` shows of this node, as plain JSON data."""
        assert self._signer is not None  # set before serving
        record = self._signer.view(self._client_view())
        return {"peer_id": record.peer_id, "seq": record.seq, **jsonable(record.body)}

    async def _start_gateway(self, nursery: trio.Nursery, config: GatewayConfig) -> None:
        """Serve the gateway; a busy port is a ConfigError unless the fallback applies."""
        try:
            await nursery.start(self._gateway(config).run)
            return
        except BaseException as raised:  # a group from the gateway's nursery
            exc = sole_error(raised)
            if not (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE):
                raise
        where = f"{config.host}:{config.port}"
        if not self.config.http_fallback:
            raise ConfigError(f"HTTP gateway: {where} is in use (--http HOST:PORT or off)")
        log.warning("HTTP gateway: %s is in use (another node?); taking a free port", where)
        await nursery.start(self._gateway(dataclasses.replace(config, port=0)).run)

    def _gateway(self, config: GatewayConfig) -> Gateway:
        """The HTTP gateway: its requests run through ``service`` like any client's."""
        assert self.service is not None and self.membership is not None  # set before serving
        service, membership = self.service, self.membership
        backend = Backend(
            execute=service.execute,
            models=lambda: swarm_models((r.info for r in self._runners.values()), membership.table),
            status=self.status,
            metrics=self.metrics.render if self.metrics is not None else None,
            load_model=self.load_model,
            unload_model=self.unload_model,
            feed=self.feed,
            table=lambda: membership.table,
            backends=self.backends_view,
            select_peer=self.select_peer,
        )
        grace = self.config.shutdown_grace_s + ANSWER_WAIT_S
        self.gateway = Gateway(backend, config, shutdown=self._stop.wait, grace_s=grace)
        return self.gateway

    def describe(self) -> dict[str, Any]:
        """The body of this node's full capability record (load travels in heartbeats)."""
        assert self.hardware is not None and self.service is not None  # set before serving
        assert self.membership is not None
        body = record_body(
            addrs=self.addrs,
            hardware=self.hardware,
            models=[r.info for r in self._runners.values()],
            load=self.service.load(),
        )
        circuits = {
            name: breaker
            for name, state in self.runner_status().items()
            if isinstance(breaker := _find(state, "breaker"), str)
        }
        extra = {"circuits": circuits} if circuits else {}
        return {**body, **extra, "peers": self.membership.peer_sample()}

    def _routing_view(self) -> dict[str, Any]:
        assert self.router is not None and self.dispatcher is not None  # set before serving
        described = self.router.describe()
        return {
            "strategy": described["strategy"],
            "max_attempts": described["max_attempts"],
            "failovers": self.dispatcher.failovers,
            "peer_breakers": described["peers"],
        }

    def _local_node(self) -> LocalNode:
        assert self.service is not None  # set before serving
        circuits = {
            name: breaker
            for name, state in self.runner_status().items()
            if isinstance(breaker := _find(state, "breaker"), str)
        }
        return LocalNode(
            models=[r.info for r in self._runners.values()],
            load=self.service.load(),
            circuits=circuits,
        )

    def backends_view(self) -> dict[str, Any]:
        """The models served here, what runs each and its live state, and the models that
        did not load with why (MCP's list_backends). No keys, no backend addresses."""
        states = self.runner_status()
        models = [
            {**runner.info.describe(), "state": states.get(name) or {}}
            for name, runner in self._runners.items()
        ]
        return {"node": self.peer_id, "models": models, "failed": dict(self.failed_models)}

    def select_peer(
        self, model: str, strategy: str | None = None, priority: Priority = Priority.NORMAL
    ) -> dict[str, Any]:
        """Where a job for ``model`` would run now, and the candidates with their scores
        (MCP's select_peer); runs nothing. Raises BadStrategy for an unknown strategy."""
        assert self._planner is not None and self.router is not None  # set before serving
        preview = self._planner.preview(model, strategy, priority)

        def candidate(c: Candidate) -> dict[str, Any]:
            return {
                "node": c.peer_id,
                "local": c.local,
                "model": c.model,
                "device": c.device,
                "score": round(c.score, 6),
                "probe": c.probe,
            }

        chosen = preview.chosen
        return {
            "strategy": strategy or str(self.router.config.strategy),
            "chosen": None if chosen is None else candidate(chosen),
            "order": [c.peer_id for c in preview.order],
            "candidates": [candidate(c) for c in preview.candidates],
        }

    def runner_status(self) -> dict[str, dict[str, Any]]:
        """Each runner's live state (circuit breaker, batching), for status and records.

        Backend addresses stay on this node: peers and clients learn the state of
        a model's backend, not where it is.
        """
        out = {}
        for name, runner in self._runners.items():
            state = runner.status()
            if state:
                out[name] = _without(state, "base_url")
        return out

    def _write_state(self) -> None:
        """Where the CLI finds the running daemon of this data dir."""
        state = {
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "addrs": self.addrs,
            # Where `swarm status`, `swarm mcp` and HTTP clients find the gateway.
            "http": self.gateway.url if self.gateway is not None else None,
        }
        path = self.config.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)


def _without(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``data`` without ``key`` at any depth."""
    return {
        k: _without(v, key) if isinstance(v, Mapping) else v for k, v in data.items() if k != key
    }


def _find(data: Mapping[str, Any], key: str) -> Any:
    """The first value of ``key`` at any depth of ``data`` (None if absent)."""
    if key in data:
        return data[key]
    for value in data.values():
        if isinstance(value, Mapping) and (found := _find(value, key)) is not None:
            return found
    return None


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The running daemon's pid, peer id, addresses and gateway URL (``http``, None
    when off), if one is running there."""
    path = data_dir / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None  # a stale file from a daemon that died
    return state
