"""The peer table reducer: pure, fast, and checked against any sequence of events.

Each rule of ``bootstrap.table`` is fed as events and read back through the
queries the node uses (``serving``, ``live_peers``, ``rows``); then hypothesis
throws arbitrary event sequences at it and checks the invariants after each one.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.events import Discovered, DiscoveryProblem, Source
from bootstrap.table import (
    Event,
    Heard,
    PeerTable,
    RecordRefused,
    RecordVerified,
    Reported,
    Status,
    TableConfig,
    Tick,
    Unreachable,
    apply,
    hardware_summary,
    live_peers,
    rows,
    serving,
)
from capabilities.hardware import CudaDevice, Hardware, OpenVINODevice
from capabilities.record import Load, record_body
from protocols import ConfigError
from runners.fake import FakeRunner

A, B, C = "12D3KooWAAAA", "12D3KooWBBBB", "12D3KooWCCCC"
ADDR = "/ip4/10.0.0.1/tcp/4001"
HARDWARE = Hardware(
    cpu_model="Test CPU 9000",
    physical_cores=4,
    logical_cores=8,
    usable_cores=8,
    ram_total=16 * 2**30,
    ram_available=8 * 2**30,
    openvino_devices=(
        OpenVINODevice("CPU", "Test CPU 9000", True),
        OpenVINODevice("GPU.0", "Test iGPU", True),
        OpenVINODevice("NPU", "", False, "no driver"),
    ),
    cuda_devices=(CudaDevice(0, "NVIDIA H100", 80 * 2**30, (9, 0)),),
    cuda_status="ok",
)


def body(*models: str, addrs: tuple[str, ...] = (), in_flight: int = 0) -> dict[str, Any]:
    """A real record body (capabilities.record), serving fake ``models``."""
    return record_body(
        hardware=HARDWARE,
        models=[FakeRunner(m).info for m in models],
        load=Load(in_flight=in_flight),
        addrs=addrs,
        version="0.1.0",
    )


def found(pid: str, at: float, source: Source = Source.MDNS, *addrs: str) -> Reported:
    return Reported(Discovered(pid, addrs or (ADDR,), source), at)


def run(*events: Event, table: PeerTable | None = None) -> PeerTable:
    table = table or PeerTable()
    for event in events:
        table = apply(table, event)
    return table


# ---------------------------------------------------------------------------
# rules, one at a time


def test_discovery_then_record_then_silence() -> None:
    table = run(found(A, 1.0))
    assert table.peers[A].status is Status.DISCOVERED and serving(table, "echo") == []
    assert live_peers(table) == []

    table = run(RecordVerified(A, 1, body("echo"), at=2.0), table=table)
    assert table.peers[A].status is Status.LINKED and table.peers[A].last_seen == 2.0
    assert (
        [p.peer_id for p in serving(table, "echo")] == [A] == [p.peer_id for p in live_peers(table)]
    )

    table = run(Tick(17.0), table=table)  # 15 s exactly: still there
    assert A in table.peers
    table = run(Tick(17.5), table=table)
    assert table.peers == {} and table.drops == 1 and serving(table, "echo") == []


def test_heartbeats_keep_a_peer_alive() -> None:
    table = run(found(A, 0.0), RecordVerified(A, 1, body("echo"), at=0.0))
    for t in range(5, 60, 5):
        table = run(Heard(A, at=float(t)), Tick(float(t) + 0.5), table=table)
    assert table.peers[A].last_seen == 55.0 and serving(table, "echo")
    assert A not in run(Tick(70.1), table=table).peers


def test_rediscovery_after_drop() -> None:
    table = run(found(A, 0.0), RecordVerified(A, 1, body("echo"), at=0.0), Tick(20.0))
    assert A not in table.peers
    table = run(found(A, 21.0, Source.DHT), table=table)
    peer = table.peers[A]
    assert peer.status is Status.DISCOVERED and peer.body is None and peer.seq is None
    assert peer.sources == {Source.DHT}  # a new life: the old sources are gone
    table = run(RecordVerified(A, 1, body("echo"), at=22.0), table=table)
    assert serving(table, "echo")  # seq 1 again is fine: the table forgot the old one


def test_refused_record_serves_nothing() -> None:
    table = run(found(A, 0.0), RecordRefused(A, "bad-signature: forged", at=1.0))
    assert table.peers[A].status is Status.REFUSED and table.refusals == 1
    assert serving(table, "echo") == [] and live_peers(table) == []

    # A peer that served, then sends a bad record, stops serving.
    table = run(found(B, 0.0), RecordVerified(B, 1, body("echo"), at=0.0))
    table = run(RecordRefused(B, "replayed", at=1.0), table=table)
    peer = table.peers[B]
    assert (peer.status, peer.reason, peer.body, peer.models) == (
        Status.REFUSED,
        "replayed",
        None,
        (),
    )
    assert serving(table, "echo") == []
    # Heartbeats don't restore trust; a good record does.
    table = run(Heard(B, at=2.0, load={"in_flight": 1}), table=table)
    assert table.peers[B].status is Status.REFUSED and table.peers[B].load is None
    table = run(RecordVerified(B, 2, body("echo"), at=3.0), table=table)
    assert [p.peer_id for p in serving(table, "echo")] == [B]


def test_refusals_of_strangers_are_counted_not_listed() -> None:
    table = run(RecordRefused(C, "unverifiable-peer-id", at=1.0))
    assert table.peers == {} and table.refusals == 1


def test_strangers_cannot_add_themselves_by_talking() -> None:
    table = run(Heard(A, at=1.0, load={"in_flight": 0}), Unreachable(A, "dial failed", at=1.0))
    assert table.peers == {}


def test_sources_and_addresses_merge() -> None:
    table = run(
        found(A, 1.0, Source.MDNS, "/ip4/192.168.1.5/tcp/4001"),
        found(A, 2.0, Source.BOOTSTRAP, "/ip4/203.0.113.7/tcp/4001", "/ip4/192.168.1.5/tcp/4001"),
        found(A, 1.5, Source.DHT, "/ip4/203.0.113.7/tcp/4001"),
        RecordVerified(A, 1, body("echo", addrs=(f"/ip4/10.9.9.9/tcp/1/p2p/{A}",)), at=2.5),
    )
    peer = table.peers[A]
    assert peer.sources == {Source.MDNS, Source.BOOTSTRAP, Source.DHT}
    assert peer.addrs == (
        "/ip4/10.9.9.9/tcp/1",  # what the peer signed comes first, /p2p/<own id> stripped
        "/ip4/192.168.1.5/tcp/4001",
        "/ip4/203.0.113.7/tcp/4001",
    )
    assert peer.last_seen == 2.5  # an older event (1.5) did not move it back


def test_addresses_are_capped() -> None:
    many = tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(50))
    table = run(found(A, 0.0, Source.MDNS, *many), table=PeerTable(TableConfig(max_addrs=4)))
    assert table.peers[A].addrs == many[:4]


def test_serving_filters() -> None:
    table = run(
        RecordVerified(A, 1, body("All-MiniLM-L6-v2", "echo"), at=1.0),
        RecordVerified(B, 1, body("all-minilm-l6-v2"), at=1.0),
        RecordVerified(C, 1, body("other"), at=1.0),
    )
    assert [p.peer_id for p in serving(table, "ALL-MINILM-L6-V2")] == [A, B]
    assert [p.peer_id for p in serving(table, "echo")] == [A]
    assert serving(table, "missing") == [] and serving(table, "") == []

    table = run(Unreachable(A, "connection refused", at=2.0), table=table)
    assert [p.peer_id for p in serving(table, "all-minilm-l6-v2")] == [B]
    assert table.peers[A].reason == "connection refused"
    table = run(Heard(A, at=3.0), table=table)  # back
    assert table.peers[A].status is Status.LINKED and table.peers[A].reason is None
    assert len(serving(table, "all-minilm-l6-v2")) == 2


def test_late_failure_does_not_override_fresher_contact() -> None:
    table = run(RecordVerified(A, 1, body("echo"), at=5.0), Unreachable(A, "timeout", at=4.0))
    assert table.peers[A].status is Status.LINKED


def test_older_record_arriving_late_is_ignored() -> None:
    table = run(
        RecordVerified(A, 5, body("new"), at=1.0), RecordVerified(A, 4, body("old"), at=2.0)
    )
    assert table.peers[A].seq == 5 and table.peers[A].models == ("new",)
    table = run(RecordVerified(A, 5, body("new"), at=3.0), table=table)  # a re-fetch
    assert table.peers[A].last_seen == 3.0


def test_load_from_record_then_heartbeats() -> None:
    table = run(RecordVerified(A, 1, body("echo", in_flight=3), at=1.0))
    assert table.peers[A].load == Load(in_flight=3).describe()
    table = run(
        Heard(A, at=2.0, load={"in_flight": 7}),
        Heard(A, at=1.5, load={"in_flight": 1}),
        table=table,
    )
    assert table.peers[A].load == {"in_flight": 7}  # the older heartbeat lost
    assert table.peers[A].last_seen == 2.0  # and did not move last_seen back
    table = run(Heard(A, at=3.0), table=table)  # a ping without load keeps it
    assert table.peers[A].load == {"in_flight": 7}


def test_record_expiry_takes_the_record_back() -> None:
    table = run(RecordVerified(A, 1, body("echo"), at=0.0, expires_at=10.0), Heard(A, at=9.0))
    assert serving(run(Tick(9.9), table=table), "echo")
    table = run(Tick(10.0), table=table)
    peer = table.peers[A]
    assert peer.status is Status.DISCOVERED and peer.body is None and serving(table, "echo") == []


def test_stale_evidence_is_ignored() -> None:
    table = run(Tick(100.0), found(A, 50.0), RecordVerified(B, 1, body("echo"), at=80.0))
    assert table.peers == {}
    table = run(found(A, 90.0), Heard(A, at=70.0), table=table)
    assert table.peers[A].last_seen == 90.0


def test_discovery_problems_for_status() -> None:
    table = run(
        Reported(DiscoveryProblem(Source.MDNS, "no mDNS answers on any interface"), 1.0),
        Reported(DiscoveryProblem(Source.BOOTSTRAP, "203.0.113.7: connection refused"), 2.0),
        Reported(DiscoveryProblem(Source.MDNS, "no mDNS answers on any interface"), 5.0),
    )
    assert table.problems[Source.MDNS].since == 1.0  # the same problem since 1.0
    table = run(Reported(DiscoveryProblem(Source.MDNS, None), 6.0), table=table)
    assert set(table.problems) == {Source.BOOTSTRAP}
    assert table.problems[Source.BOOTSTRAP].text == "203.0.113.7: connection refused"


def test_a_full_table_evicts_the_stalest_unlinked_peer() -> None:
    config = TableConfig(max_peers=2)
    table = run(RecordVerified(A, 1, body("echo"), at=0.0), found(B, 1.0), table=PeerTable(config))
    table = run(found(C, 2.0), table=table)
    assert set(table.peers) == {A, C}  # B (unlinked) made room; A (linked) stayed
    table = run(RecordVerified(C, 1, body("x"), at=3.0), found("12D3KooWDDDD", 4.0), table=table)
    assert set(table.peers) == {A, C}  # all linked: the newcomer waits


def test_apply_is_pure() -> None:
    table = run(found(A, 1.0), RecordVerified(A, 1, body("echo"), at=1.0))
    snapshot = copy.deepcopy(table)
    for event in (Tick(100.0), RecordRefused(A, "x", 2.0), found(B, 2.0), Heard(A, 3.0, {})):
        apply(table, event)
    assert table == snapshot


def test_rows_for_swarm_peers() -> None:
    table = run(
        found(A, 1.0, Source.MDNS, "/ip4/192.168.1.5/tcp/4001"),
        found(A, 1.0, Source.PEERSTORE),
        RecordVerified(A, 3, body("echo", "embed", in_flight=2), at=2.0),
        found(B, 4.0, Source.DHT),
        Tick(5.0),
    )
    row_a, row_b = rows(table)
    assert row_a == {
        "peer_id": A,
        "status": "linked",
        "reason": None,
        "addrs": ["/ip4/192.168.1.5/tcp/4001", ADDR],
        "hardware": "Test CPU 9000 (8 threads), 16 GiB RAM, CUDA: NVIDIA H100, "
        "OpenVINO: CPU, GPU.0",
        "models": ["echo", "embed"],
        "content": [],
        "model_content": {},
        "load": Load(in_flight=2).describe(),
        "last_seen": 2.0,
        "seen_ago_s": 3.0,
        "found_by": ["mdns", "peerstore"],
    }
    assert row_b["status"] == "discovered" and row_b["hardware"] == "" and row_b["models"] == []


@pytest.mark.parametrize(
    "odd",
    [None, {}, {"hardware": 5}, {"hardware": {"cpu": "x", "cuda": [1, {"name": 2}]}}],
)
def test_hardware_summary_tolerates_any_body(odd: Any) -> None:
    assert hardware_summary(odd) == ""


def test_config_is_validated() -> None:
    for bad in ({"dead_after_s": 0}, {"max_peers": 0}, {"max_addrs": -1}):
        with pytest.raises(ConfigError):
            TableConfig(**bad)


# ---------------------------------------------------------------------------
# any sequence of events keeps the invariants

PEERS = st.sampled_from([A, B, C, "12D3KooWDDDD", ""])
MODELS = st.sampled_from(["echo", "ECHO", "embed"])
odd_bodies = st.sampled_from([{}, {"models": "echo"}, {"models": [1, {"name": 3}]}, {"load": 7}])
bodies = st.lists(MODELS, max_size=2).map(lambda ms: body(*ms)) | odd_bodies
SOURCES = st.sampled_from(list(Source))
# Each event is made from its time, so that the clock can run mostly forward.
makers = st.one_of(
    st.builds(lambda p, s: lambda at: found(p, at, s), PEERS, SOURCES),
    st.builds(
        lambda s, text: lambda at: Reported(DiscoveryProblem(s, text), at),
        SOURCES,
        st.none() | st.sampled_from(["down", "empty"]),
    ),
    st.builds(
        lambda p, seq, b, ttl: lambda at: RecordVerified(p, seq, b, at, ttl and at + ttl),
        PEERS,
        st.integers(0, 5),
        bodies,
        st.none() | st.integers(1, 30),
    ),
    st.builds(lambda p: lambda at: RecordRefused(p, "bad-signature", at), PEERS),
    st.builds(
        lambda p, load: lambda at: Heard(p, at, load), PEERS, st.none() | st.just({"in_flight": 1})
    ),
    st.builds(lambda p: lambda at: Unreachable(p, "timeout", at), PEERS),
    st.just(Tick),
)
# (make the event, seconds the clock moves first, how late the event is stamped)
LATE = st.sampled_from([0, 0, 0, 1, 4, 17])  # mostly on time, some out of order, some stale
steps = st.lists(st.tuples(makers, st.integers(0, 12), LATE), max_size=50)


def timeline(plan: list[tuple[Any, int, int]]) -> list[Event]:
    clock, out = 0.0, []
    for make, advance, late in plan:
        clock += advance
        out.append(make(max(0.0, clock - late)))
    return out


@settings(max_examples=500, deadline=None)
@given(steps, st.sampled_from([TableConfig(), TableConfig(5.0, 3, 2)]))
def test_any_event_sequence_keeps_the_invariants(plan: Any, config: TableConfig) -> None:
    table = PeerTable(config)
    for event in timeline(plan):
        before, table = table, apply(table, event)
        assert table.now >= before.now
        assert len(table.peers) <= config.max_peers
        for pid, peer in table.peers.items():
            assert pid and pid == peer.peer_id  # no peer without an id
            assert len(peer.addrs) <= config.max_addrs
            if peer.models:  # only a verified record lists models
                assert peer.body is not None and peer.status in (Status.LINKED, Status.UNREACHABLE)
            if peer.status is Status.REFUSED:
                assert peer.body is None and peer.load is None
            if pid in before.peers:  # last seen never goes back while a peer stays
                assert peer.last_seen >= before.peers[pid].last_seen
        for model in ("echo", "embed"):
            for peer in serving(table, model):
                assert peer.status is Status.LINKED and peer.body is not None
                assert model in [m.casefold() for m in peer.models]
        if isinstance(event, Tick):  # nobody older than dead_after after a Tick
            assert all(table.now - p.last_seen <= config.dead_after_s for p in table.peers.values())
        assert [r["peer_id"] for r in rows(table)] == sorted(table.peers)


def test_a_heartbeat_vouching_for_the_record_renews_its_expiry() -> None:
    table = run(RecordVerified(A, 1, body("echo"), at=0.0, expires_at=10.0))
    table = run(Heard(A, at=9.0, renews_until=30.0), Tick(12.0), table=table)
    assert serving(table, "echo") and table.peers[A].expires_at == 30.0
    # A renewal never shortens; a plain heartbeat keeps the peer, not the record.
    table = run(Heard(A, at=13.0, renews_until=20.0), Heard(A, at=25.0), table=table)
    assert table.peers[A].expires_at == 30.0
    table = run(Tick(30.0), table=table)
    assert table.peers[A].body is None and serving(table, "echo") == []
    # Nothing to renew once the record is gone: the peer must send it again.
    table = run(Heard(A, at=31.0, renews_until=90.0), Tick(32.0), table=table)
    assert table.peers[A].expires_at is None and serving(table, "echo") == []
