"""Reach's pure parts: which addresses go where, and the reachability verdict.

No network: the address policy is fed address lists, the verdict reducer is fed
dial-back answers with their times (node.reach.addresses, node.reach.reachability).
"""

from __future__ import annotations

import pytest

from bootstrap.table import PeerTable, RecordVerified
from bootstrap.table import apply as table_apply
from node.reach.addresses import (
    MAX_CANDIDATES,
    Scope,
    dial_back_candidates,
    endpoint,
    lan_addrs,
    loopback_only,
    scope,
    wide_addrs,
    with_peer_id,
    without_peer_id,
)
from node.reach.config import Mode, Reach, ReachConfig
from node.reach.reachability import (
    Addresses,
    Answered,
    Asked,
    DialResult,
    NoAnswer,
    Outcome,
    ReachState,
    apply,
    next_asks,
)
from node.reach.records import reach_of, record_keys, relay_candidates
from protocols.errors import ConfigError

PID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
HOME = ("/ip4/192.168.1.2/tcp/7420", "/ip4/127.0.0.1/tcp/7420")  # behind a NAT
FLAT = ("/ip4/10.88.0.2/tcp/7420", "/ip4/127.0.0.1/tcp/7420")  # on the "public" bridge
LOOP = ("/ip4/127.0.0.1/tcp/41000",)
CIRCUIT = "/ip4/10.88.0.1/tcp/7420/p2p/12D3KooWRelay/p2p-circuit"
WAN = "10.88.0.11"  # home 1's router, as peers outside see us


# -- addresses ----------------------------------------------------------------------------


def test_endpoints_and_scopes_are_read_from_tcp_addresses_only() -> None:
    point = endpoint(f"/ip4/192.168.1.2/tcp/7420/p2p/{PID}")
    assert point is not None and (str(point.ip), point.port) == ("192.168.1.2", 7420)
    assert endpoint("/ip6/::1/tcp/1") is not None
    for junk in ("", "/ip4/1.2.3.4", "/ip4/1.2.3.4/udp/1", "/dns4/a.b/tcp/1", CIRCUIT,
                 "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/70000", "/ip4/::1/tcp/1",
                 "/ip4/1.2.3.4/tcp/1/ws"):  # fmt: skip
        assert endpoint(junk) is None, junk
    assert scope("/ip4/127.0.0.1/tcp/1") is Scope.LOOPBACK
    assert scope("/ip4/192.168.1.2/tcp/1") is Scope.PRIVATE
    assert scope("/ip4/100.64.0.1/tcp/1") is Scope.PRIVATE  # CGNAT
    assert scope("/ip4/8.8.8.8/tcp/1") is Scope.GLOBAL
    assert without_peer_id(f"/ip4/1.2.3.4/tcp/1/p2p/{PID}") == "/ip4/1.2.3.4/tcp/1"
    assert without_peer_id(CIRCUIT) == CIRCUIT  # the relay's id stays
    assert with_peer_id([f"/ip4/1.2.3.4/tcp/1/p2p/{PID}"], PID) == (
        f"/ip4/1.2.3.4/tcp/1/p2p/{PID}",
    )


def test_a_natted_node_announces_no_private_address_widely_but_all_on_the_lan() -> None:
    for reach in Reach:
        assert wide_addrs(HOME, mode=Mode.AUTO, reach=reach) == ()
        assert wide_addrs(HOME, mode=Mode.AUTO, reach=reach, circuits=[CIRCUIT]) == (CIRCUIT,)
    assert lan_addrs(HOME) == ("/ip4/192.168.1.2/tcp/7420",)


def test_a_confirmed_address_is_announced_only_while_public() -> None:
    confirmed = ["/ip4/10.88.0.2/tcp/7420"]
    public = wide_addrs(FLAT, mode=Mode.AUTO, reach=Reach.PUBLIC, confirmed=confirmed)
    assert public == ("/ip4/10.88.0.2/tcp/7420",)
    for reach in (Reach.PRIVATE, Reach.UNKNOWN):
        assert wide_addrs(FLAT, mode=Mode.AUTO, reach=reach, confirmed=confirmed) == ()


def test_global_listen_addresses_go_out_unless_a_dial_back_refuted_them() -> None:
    listening = ("/ip4/93.184.216.34/tcp/7420", "/ip4/192.168.0.3/tcp/7420")
    assert wide_addrs(listening, mode=Mode.AUTO, reach=Reach.UNKNOWN) == (listening[0],)
    refuted = [listening[0]]
    assert wide_addrs(listening, mode=Mode.AUTO, reach=Reach.PRIVATE, refuted=refuted) == ()


def test_loopback_only_nodes_announce_loopback_a_swarm_on_one_machine() -> None:
    assert loopback_only(LOOP) and not loopback_only(HOME) and not loopback_only(())
    for reach in Reach:
        assert wide_addrs(LOOP, mode=Mode.AUTO, reach=reach) == LOOP
    assert lan_addrs(LOOP) == LOOP
    # Told it is private, it announces its relayed addresses only, even on one machine.
    assert wide_addrs(LOOP, mode=Mode.PRIVATE, reach=Reach.PRIVATE) == ()
    assert wide_addrs(LOOP, mode=Mode.PRIVATE, reach=Reach.PRIVATE, circuits=[CIRCUIT]) == (
        CIRCUIT,
    )


def test_configured_public_announces_what_it_was_told() -> None:
    assert wide_addrs(HOME, mode=Mode.PUBLIC, reach=Reach.PUBLIC) == (HOME[0],)
    given = ["/ip4/203.0.113.9/tcp/17420"]
    for mode in (Mode.PUBLIC, Mode.AUTO):
        assert wide_addrs(HOME, mode=mode, reach=Reach.PUBLIC, public_addrs=given) == tuple(given)


def test_reach_config_is_validated() -> None:
    assert ReachConfig().configured is None
    assert ReachConfig(mode=Mode.PUBLIC).configured is Reach.PUBLIC
    assert ReachConfig(public_addrs=("/ip4/1.2.3.4/tcp/1",)).configured is Reach.PUBLIC
    assert ReachConfig(mode="private").configured is Reach.PRIVATE  # type: ignore[arg-type]
    for bad in (
        {"mode": "sometimes"},
        {"mode": Mode.PRIVATE, "public_addrs": ("/ip4/1.2.3.4/tcp/1",)},
        {"public_addrs": ("1.2.3.4:1",)},
        {"public_addrs": (CIRCUIT,)},
        {"recheck_s": 0.0},
        {"max_asking": 0},
    ):
        with pytest.raises(ConfigError):
            ReachConfig(**bad)


def test_dial_back_candidates_put_observed_ips_first_with_our_ports() -> None:
    assert dial_back_candidates(HOME, [WAN]) == (f"/ip4/{WAN}/tcp/7420", HOME[0])
    assert dial_back_candidates(HOME, []) == (HOME[0],)  # never loopback beyond one machine
    assert dial_back_candidates(HOME, ["127.0.0.1", "junk"]) == (HOME[0],)
    assert dial_back_candidates(LOOP, ["127.0.0.1"]) == LOOP
    many = [f"10.0.0.{i}" for i in range(20)]
    assert len(dial_back_candidates(HOME, many)) == MAX_CANDIDATES


# -- the verdict ------------------------------------------------------------------------


def ok(addr: str) -> DialResult:
    return DialResult(addr, Outcome.OK)


def failed(addr: str) -> DialResult:
    return DialResult(addr, Outcome.FAILED, "timed out")


def refused(addr: str) -> DialResult:
    return DialResult(addr, Outcome.REFUSED, "not the address you connect from")


def started(
    listening: tuple[str, ...] = FLAT,
    linked: int = 1,
    config: ReachConfig | None = None,
    observed: tuple[str, ...] = (),
) -> ReachState:
    own = frozenset(a.split("/")[2] for a in listening)
    state = ReachState(config or ReachConfig())
    return apply(state, Addresses(own, dial_back_candidates(listening, observed), linked, 0.0))


def answer(
    state: ReachState, peer: str, observed: str, *results: DialResult, at: float = 1.0
) -> ReachState:
    state = apply(state, Asked(peer, tuple(r.addr for r in results), at))
    return apply(state, Answered(peer, observed, results, at))


def test_behind_a_nat_one_failed_dial_back_makes_it_private() -> None:
    state = started(HOME, observed=(WAN,))
    assert state.verdict.reach is Reach.UNKNOWN
    addr = f"/ip4/{WAN}/tcp/7420"
    state = answer(state, "peerR", WAN, failed(addr), refused(HOME[0]))
    v = state.verdict
    assert v.reach is Reach.PRIVATE and v.refuted == (addr,)
    assert v.why == f"behind a NAT: peerR sees us at {WAN} and could not dial {WAN}:7420 back"


def test_lan_peers_confirmations_do_not_count_once_a_nat_is_seen() -> None:
    state = started(HOME, linked=2, observed=(WAN,))
    state = answer(state, "lanpeer", "192.168.1.2", ok(HOME[0]))  # it sits in our home
    state = answer(state, "lanpeer2", "192.168.1.2", ok(HOME[0]))
    assert state.verdict.reach is Reach.PUBLIC  # nothing says there is a NAT yet
    state = answer(state, "outside", WAN, failed(f"/ip4/{WAN}/tcp/7420"), at=2.0)
    assert state.verdict.reach is Reach.PRIVATE
    assert wide_addrs(HOME, mode=Mode.AUTO, reach=state.verdict.reach) == ()


def test_public_takes_two_peers_or_one_in_a_two_node_swarm() -> None:
    addr = FLAT[0]
    state = answer(started(FLAT, linked=1), "peerR", "10.88.0.2", ok(addr))
    assert state.verdict.reach is Reach.PUBLIC and state.verdict.confirmed == (addr,)
    assert "dialled back at 10.88.0.2:7420 by 1 peer(s)" in state.verdict.why
    # With two linked, one answer is not enough...
    lone = answer(started(FLAT, linked=2), "peerR", "10.88.0.2", ok(addr))
    assert lone.verdict.reach is Reach.UNKNOWN
    both = answer(lone, "peerS", "10.88.0.2", ok(addr), at=2.0)
    assert both.verdict.reach is Reach.PUBLIC and both.verdict.by == ("peerR", "peerS")


def test_public_stays_while_more_peers_join_and_falls_on_a_failure() -> None:
    addr = FLAT[0]
    state = answer(started(FLAT, linked=1), "peerR", "10.88.0.2", ok(addr))
    state = apply(state, Addresses(state.own_ips, state.candidates, 3, 2.0))
    assert state.verdict.reach is Reach.PUBLIC  # hysteresis: one valid confirmation holds
    state = answer(state, "peerS", "10.88.0.2", failed(addr), at=3.0)
    assert state.verdict.reach is Reach.UNKNOWN and "disagree" in state.verdict.why


def test_private_stays_until_an_address_has_enough_confirmations() -> None:
    addr = FLAT[0]
    state = answer(started(FLAT, linked=3), "peerR", "10.88.0.2", failed(addr))
    assert state.verdict.reach is Reach.PRIVATE and "a firewall?" in state.verdict.why
    state = answer(state, "peerS", "10.88.0.2", ok(addr), at=2.0)
    assert state.verdict.reach is Reach.PRIVATE
    state = answer(state, "peerT", "10.88.0.2", ok(addr), at=3.0)
    assert state.verdict.reach is Reach.PUBLIC


def test_answers_expire() -> None:
    state = answer(started(FLAT), "peerR", "10.88.0.2", ok(FLAT[0]))
    later = ReachConfig().answer_valid_s + 2.0
    state = apply(state, Addresses(state.own_ips, state.candidates, 1, later))
    assert state.verdict.reach is Reach.UNKNOWN


def test_refusals_only_tell_the_observed_ip() -> None:
    state = answer(started(HOME), "peerR", WAN, refused(HOME[0]))
    assert state.verdict.reach is Reach.UNKNOWN


def test_configuration_decides_and_nothing_is_asked() -> None:
    for config, reach in (
        (ReachConfig(mode=Mode.PUBLIC), Reach.PUBLIC),
        (ReachConfig(mode=Mode.PRIVATE), Reach.PRIVATE),
        (ReachConfig(public_addrs=("/ip4/203.0.113.9/tcp/1",)), Reach.PUBLIC),
    ):
        state = started(HOME, config=config)
        assert state.verdict.reach is reach and state.verdict.why.startswith("configured")
        assert next_asks(state, ["peerR"]) == []
        state = answer(state, "peerR", WAN, failed(HOME[0]))
        assert state.verdict.reach is reach


# -- planning -----------------------------------------------------------------------------


def test_asks_up_to_max_asking_peers_never_asked_first() -> None:
    state = started(FLAT, linked=3)
    assert next_asks(state, ["c", "a", "b"]) == ["a", "b"]  # max_asking = 2, ties by id
    state = apply(state, Asked("a", state.candidates, 1.0))
    assert next_asks(state, ["c", "a", "b"]) == ["b"]  # one slot left; a is in flight
    state = answer(state, "a", "10.88.0.2", ok(FLAT[0]), at=2.0)
    assert next_asks(state, ["c", "a", "b"]) == ["b"]  # one more answer wanted, not two


def test_a_refused_only_answer_with_a_new_ip_is_asked_again_with_it() -> None:
    state = started(HOME, linked=1)
    state = answer(state, "peerR", WAN, refused(HOME[0]))
    assert next_asks(state, ["peerR"]) == []  # its IP is not among our candidates yet
    state = apply(state, Addresses(state.own_ips, dial_back_candidates(HOME, [WAN]), 1, 1.5))
    assert next_asks(state, ["peerR"]) == ["peerR"]


def test_answered_peers_are_rechecked_periodically_and_when_addresses_change() -> None:
    state = answer(started(FLAT, linked=1), "peerR", "10.88.0.2", ok(FLAT[0]))
    assert next_asks(state, ["peerR"]) == []
    config = state.config
    t = 1.0 + config.recheck_s
    state = apply(state, Addresses(state.own_ips, state.candidates, 1, t))
    assert next_asks(state, ["peerR"]) == ["peerR"]
    state = answer(state, "peerR", "10.88.0.2", ok(FLAT[0]), at=t)
    new = ("/ip4/10.88.0.2/tcp/7420", "/ip4/10.99.0.2/tcp/7420")
    state = apply(state, Addresses(state.own_ips, new, 1, t + 1))
    assert next_asks(state, ["peerR"]) == ["peerR"]  # inside reask_after_s, but new addresses


def test_a_peer_that_did_not_answer_waits_before_it_is_asked_again() -> None:
    state = started(FLAT, linked=1)
    state = apply(state, Asked("peerR", state.candidates, 1.0))
    state = apply(state, NoAnswer("peerR", "rate limited", 1.0, retry_after_s=50.0))
    assert next_asks(state, ["peerR"]) == []
    state = apply(state, Addresses(state.own_ips, state.candidates, 1, 52.0))
    assert next_asks(state, ["peerR"]) == ["peerR"]
    assert state.failures == 1


# -- record keys --------------------------------------------------------------------------


def test_record_keys_and_relay_candidates_read_records_defensively() -> None:
    entry = {"reservations": 64, "reserved": []}
    assert record_keys(Reach.PUBLIC, entry, ["b", "A", "b"]) == {
        "reach": "public",
        "relay": entry,
        "forwards": ["A", "b"],
    }
    assert record_keys(Reach.PRIVATE) == {"reach": "private"}
    table = PeerTable()
    bodies: dict[str, dict[str, object]] = {
        "relay1": {"reach": "public", "relay": entry, "addrs": ["/ip4/10.88.0.1/tcp/7420"]},
        "relay2": {"relay": entry, "addrs": [CIRCUIT, "/ip4/10.88.0.2/tcp/7420"]},  # older
        "liar": {"reach": "private", "relay": entry, "addrs": ["/ip4/10.88.0.3/tcp/7420"]},
        "plain": {"reach": "public", "relay": True, "addrs": ["/ip4/10.88.0.4/tcp/7420"]},
        "nowhere": {"reach": "public", "relay": entry, "addrs": [CIRCUIT]},
        "junk": {"reach": 7, "relay": "yes", "models": "x"},
    }
    for pid, body in bodies.items():
        table = table_apply(table, RecordVerified(pid, 1, body, at=1.0))
    assert reach_of(bodies["junk"]) is Reach.UNKNOWN and reach_of(None) is Reach.UNKNOWN
    assert relay_candidates(table) == [
        ("relay1", ("/ip4/10.88.0.1/tcp/7420",)),
        ("relay2", ("/ip4/10.88.0.2/tcp/7420",)),
    ]


def test_a_peer_on_this_machine_neither_confirms_nor_reveals_a_nat() -> None:
    listening = ("/ip4/10.0.0.5/tcp/7420",)  # an explicit LAN address, no loopback
    state = started(listening, linked=1)
    state = answer(state, "sibling", "127.0.0.1", failed("/ip4/127.0.0.1/tcp/7420"))
    assert state.verdict.reach is Reach.UNKNOWN  # not "private": it is just next door
    state = answer(state, "sibling", "127.0.0.1", ok("/ip4/127.0.0.1/tcp/7420"), at=2.0)
    assert state.verdict.reach is Reach.UNKNOWN  # nor "public"
    state = answer(state, "lan", "10.0.0.5", ok(listening[0]), at=3.0)
    assert state.verdict.reach is Reach.PUBLIC and state.verdict.by == ("lan",)
