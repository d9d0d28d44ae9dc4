"""The node's live feed: what happens on it, for WebSocket subscribers and the page.

Three topics:

- ``peers``: a peer ``joined`` (its record was verified and it is linked), ``left``
  (dropped or unreachable), or ``changed`` what it serves;
- ``jobs``: a job ``started`` on this node (submitted here or forwarded to it)
  and ``finished`` (outcome ``ok`` or the error code, milliseconds, where it ran);
- ``load``: every ``interval_s``, this node's load and each live peer's last one.

Publishing never waits: each subscriber has a bounded buffer, and a subscriber
too slow to keep up loses events rather than slowing the node. It is never left
to guess: the next event it gets is preceded by a ``feed``/``dropped`` event
saying how many it missed. The last finished jobs are also kept (a bounded ring)
so a page opened now can show what ran before it connected.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from bootstrap.table import Peer, PeerTable, live_peers
from protocols import Request

DEFAULT_BUFFER = 256  # events a subscriber may lag behind before it loses some
RECENT_JOBS = 100


class Topic(enum.StrEnum):
    PEERS = "peers"
    JOBS = "jobs"
    LOAD = "load"


FEED = "feed"  # the topic of the feed's own notices (events dropped); always delivered


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    kind: str
    at_ms: int  # wall clock, for people
    data: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "kind": self.kind, "at_ms": self.at_ms, "data": self.data}


class Subscription:
    """One subscriber's bounded buffer and the topics it wants (changeable)."""

    def __init__(self, topics: Iterable[Topic], size: int) -> None:
        self.topics: set[Topic] = set(topics)
        self._send, self.events = trio.open_memory_channel[Event](size)
        self.dropped = 0  # events lost since the subscriber last heard of a loss

    def offer(self, event: Event) -> None:
        if self.dropped:
            notice = _event(FEED, "dropped", {"count": self.dropped})
            try:
                self._send.send_nowait(notice)
            except trio.WouldBlock:
                self.dropped += 1
                return
            self.dropped = 0
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1

    def close(self) -> None:
        self._send.close()


class Feed:
    def __init__(self, recent: int = RECENT_JOBS) -> None:
        self._subscribers: set[Subscription] = set()
        self._jobs: deque[dict[str, Any]] = deque(maxlen=recent)

    def wants(self, topic: Topic) -> bool:
        return any(topic in s.topics for s in self._subscribers)

    def publish(self, topic: Topic, kind: str, data: Mapping[str, Any]) -> None:
        event = _event(topic, kind, data)
        if topic is Topic.JOBS and kind == "finished":
            self._jobs.append(event.as_json())
        for subscriber in list(self._subscribers):
            if topic in subscriber.topics:
                subscriber.offer(event)

    @contextmanager
    def subscribe(
        self, topics: Iterable[Topic] = (), size: int = DEFAULT_BUFFER
    ) -> Iterator[Subscription]:
        subscription = Subscription(topics, size)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            subscription.close()

    def recent_jobs(self) -> list[dict[str, Any]]:
        """The last finished jobs, oldest first."""
        return list(self._jobs)

    # -- what the inference service tells ---------------------------------------

    def job_started(self, request: Request) -> None:
        if self.wants(Topic.JOBS):  # on every request's path: build nothing for nobody
            self.publish(Topic.JOBS, "started", _job(request))

    def job_finished(self, request: Request, outcome: str, seconds: float, by: str | None) -> None:
        data = {**_job(request), "outcome": outcome, "ms": round(1000 * seconds, 3)}
        self.publish(Topic.JOBS, "finished", {**data, "served_by": by})


def _event(topic: str, kind: str, data: Mapping[str, Any]) -> Event:
    return Event(topic, kind, time.time_ns() // 1_000_000, data)


def _job(request: Request) -> dict[str, Any]:
    return {
        "id": request.id,
        "model": request.model,
        "priority": request.priority.name.lower(),
        "stream": request.stream,
        "forwarded": request.hops > 0,  # sent here by a peer rather than submitted here
    }


def peer_summary(peer: Peer) -> dict[str, Any]:
    """What subscribers are told of a peer: enough to draw it, nothing private."""
    body = peer.body or {}
    return {
        "peer_id": peer.peer_id,
        "addrs": list(peer.addrs),
        "models": list(peer.models),
        "hardware": body.get("hardware"),
        "load": dict(peer.load) if peer.load is not None else None,
    }


async def watch_peers(
    feed: Feed, table: Callable[[], PeerTable], changed: Callable[[], Any]
) -> None:
    """Publish joins, departures and changes of the live peers as the table moves."""
    known: dict[str, tuple[str, ...]] = {}
    while True:
        now = {p.peer_id: p for p in live_peers(table())}
        for peer_id in known.keys() - now.keys():
            reason = getattr(table().peers.get(peer_id), "reason", None)
            feed.publish(Topic.PEERS, "left", {"peer_id": peer_id, "reason": reason})
        for peer_id, peer in now.items():
            if peer_id not in known:
                feed.publish(Topic.PEERS, "joined", peer_summary(peer))
            elif known[peer_id] != peer.models:
                feed.publish(Topic.PEERS, "changed", peer_summary(peer))
        known = {peer_id: peer.models for peer_id, peer in now.items()}
        await changed()


async def report_load(
    feed: Feed,
    self_id: str,
    own_load: Callable[[], Mapping[str, Any]],
    table: Callable[[], PeerTable],
    interval_s: float = 1.0,
) -> None:
    """Every ``interval_s``, while anyone listens: this node's load and its peers'."""
    while True:
        await trio.sleep(interval_s)
        if not feed.wants(Topic.LOAD):
            continue
        loads = {self_id: dict(own_load())}
        for peer in live_peers(table()):
            if peer.load is not None:
                loads[peer.peer_id] = dict(peer.load)
        feed.publish(Topic.LOAD, "sample", {"nodes": loads})
