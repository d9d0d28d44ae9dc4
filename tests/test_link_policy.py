"""The link policy (node.membership.link_policy): properties on random swarms, then
the rules one at a time on small hand-made ones."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from node.membership.link_policy import (
    LinkInputs,
    LinkPolicy,
    PeerFacts,
    bucket,
    dht_key,
    plan_links,
)

MODELS = ("alpha", "beta", "gamma", "delta", "eps")
NOW = 1000.0
SELF = "self"


@st.composite
def swarms(draw: st.DrawFn) -> tuple[LinkInputs, LinkPolicy]:
    count = draw(st.integers(0, 40))
    ids = draw(st.lists(st.text("abcdefghjk", min_size=4, max_size=8), min_size=count, unique=True))
    peers = []
    for pid in ids:
        linked = draw(st.booleans())
        peers.append(
            PeerFacts(
                peer_id=pid,
                linked=linked,
                models=tuple(draw(st.sets(st.sampled_from(MODELS), max_size=2))),
                last_used=draw(st.one_of(st.none(), st.floats(0, NOW))),
                linked_at=draw(st.floats(0, NOW)) if linked else None,
                wants=linked and draw(st.booleans()),
                linkable=draw(st.booleans()),
            )
        )
    demand = draw(st.dictionaries(st.sampled_from(MODELS), st.floats(0, NOW), max_size=5))
    relays = draw(st.sets(st.sampled_from(ids), max_size=2)) if ids else set()
    reserved = draw(st.sets(st.sampled_from(ids), max_size=4)) if ids else set()
    policy = LinkPolicy(
        max_links=draw(st.integers(1, 40)),
        per_bucket=draw(st.integers(0, 3)),
        providers_per_model=draw(st.integers(0, 3)),
        random_links=draw(st.integers(0, 4)),
        min_links=draw(st.integers(0, 10)),
        demand_s=draw(st.floats(1, 2 * NOW)),
        idle_s=draw(st.floats(0, 2 * NOW)),
    )
    inputs = LinkInputs(
        SELF,
        NOW,
        peers,
        demand,
        frozenset(relays),
        frozenset(reserved),
        seed=draw(st.integers(0, 2**32)),
    )
    return inputs, policy


def _in_use(inputs: LinkInputs, policy: LinkPolicy) -> list[str]:
    return [m for m, at in inputs.demand.items() if NOW - at <= policy.demand_s]


def _serves(peer: PeerFacts, model: str) -> bool:
    return model in peer.models


@settings(max_examples=150, deadline=None)
@given(swarms())
def test_never_over_budget_and_every_peer_accounted_for(
    case: tuple[LinkInputs, LinkPolicy],
) -> None:
    inputs, policy = case
    plan = plan_links(inputs, policy)
    assert len(plan.keep) + len(plan.link) <= policy.max_links
    linked = {p.peer_id for p in inputs.peers if p.linked}
    assert set(plan.keep) | set(plan.drop) == linked and not set(plan.keep) & set(plan.drop)
    assert not set(plan.link) & linked
    # Only peers that may be dialled are linked; every choice names its rule.
    linkable = {p.peer_id for p in inputs.peers if p.linkable}
    assert set(plan.link) <= linkable
    assert set(plan.why) == plan.chosen


@settings(max_examples=150, deadline=None)
@given(swarms())
def test_never_drops_the_last_linked_provider_of_a_model_in_use(
    case: tuple[LinkInputs, LinkPolicy],
) -> None:
    inputs, policy = case
    in_use = _in_use(inputs, policy)
    if len(inputs.relays) + len(in_use) > policy.max_links:
        return  # the guarantee holds while the relays and one provider per model fit
    plan = plan_links(inputs, policy)
    by_id = {p.peer_id: p for p in inputs.peers}
    for model in in_use:
        if any(p.linked and _serves(p, model) for p in inputs.peers):
            assert any(_serves(by_id[pid], model) for pid in plan.keep), model


@settings(max_examples=150, deadline=None)
@given(swarms())
def test_keeps_dht_buckets_filled_while_the_budget_has_room(
    case: tuple[LinkInputs, LinkPolicy],
) -> None:
    inputs, policy = case
    plan = plan_links(inputs, policy)
    if len(plan.chosen) >= policy.max_links:
        return  # full: buckets came after higher rules
    candidates: dict[int, set[str]] = {}
    for p in inputs.peers:
        if p.linked or p.linkable:
            candidates.setdefault(bucket(SELF, p.peer_id), set()).add(p.peer_id)
    for index, members in candidates.items():
        assert len(members & plan.chosen) >= min(policy.per_bucket, len(members)), index


@settings(max_examples=100, deadline=None)
@given(swarms(), st.randoms())
def test_deterministic_for_a_seed_whatever_the_order(
    case: tuple[LinkInputs, LinkPolicy], rng: random.Random
) -> None:
    inputs, policy = case
    shuffled = list(inputs.peers)
    rng.shuffle(shuffled)
    assert plan_links(inputs, policy) == plan_links(replace(inputs, peers=shuffled), policy)


@settings(max_examples=100, deadline=None)
@given(swarms())
def test_relays_are_kept_first(case: tuple[LinkInputs, LinkPolicy]) -> None:
    inputs, policy = case
    plan = plan_links(inputs, policy)
    held = [p for p in inputs.peers if p.peer_id in inputs.relays and (p.linked or p.linkable)]
    assert len([p for p in held if p.peer_id in plan.chosen]) == min(len(held), policy.max_links)


# -- the rules on small swarms -------------------------------------------------------


def _peer(pid: str, **fields: object) -> PeerFacts:
    return PeerFacts(pid, **fields)  # type: ignore[arg-type]


def test_a_model_in_use_without_a_linked_provider_links_a_known_one() -> None:
    peers = [
        _peer("a", linked=True, linked_at=990.0),
        _peer("b", models=("beta",)),
        _peer("c", models=("beta",), last_used=900.0),
    ]
    plan = plan_links(
        LinkInputs(SELF, NOW, peers, {"beta": 999.0}),
        LinkPolicy(max_links=2, random_links=0, min_links=0, per_bucket=0, providers_per_model=1),
    )
    # The one used before is linked; the budget's other slot keeps a (linked lately).
    assert plan.link == ("c",) and plan.why["c"] == "provider"
    assert plan.keep == ("a",) and plan.why["a"] == "idle"


def test_the_last_provider_outranks_wanted_buckets_and_random() -> None:
    peers = [
        _peer("p", linked=True, models=("beta",), linked_at=0.0, last_used=10.0),
        _peer("w1", linked=True, wants=True, linked_at=900.0),
        _peer("w2", linked=True, wants=True, linked_at=950.0),
    ]
    plan = plan_links(LinkInputs(SELF, NOW, peers, {"beta": 990.0}), LinkPolicy(max_links=2))
    # The provider stays; of the two that want the link, the newer one.
    assert set(plan.keep) == {"p", "w2"} and plan.drop == ("w1",)


def test_idle_links_age_out_and_demand_expires() -> None:
    policy = LinkPolicy(idle_s=60.0, demand_s=100.0, random_links=0, min_links=0, per_bucket=0)
    peers = [
        _peer("old", linked=True, linked_at=0.0, last_used=800.0),
        _peer("new", linked=True, linked_at=980.0),
        _peer("served", linked=True, models=("beta",), linked_at=0.0, last_used=0.0),
    ]
    plan = plan_links(LinkInputs(SELF, NOW, peers, {"beta": 850.0}), policy)
    assert plan.keep == ("new",) and set(plan.drop) == {"old", "served"}
    busy = plan_links(LinkInputs(SELF, NOW, peers, {"beta": 950.0}), policy)
    assert set(busy.keep) == {"new", "served"} and busy.why["served"] == "provider"


def test_one_peer_per_bucket_nearest_first_linked_before_known() -> None:
    ids = [f"peer{i}" for i in range(40)]
    by_bucket: dict[int, list[str]] = {}
    for pid in ids:
        by_bucket.setdefault(bucket(SELF, pid), []).append(pid)
    linked = {members[-1] for members in by_bucket.values()}
    peers = [_peer(pid, linked=pid in linked, linked_at=0.0) for pid in ids]
    policy = LinkPolicy(max_links=40, random_links=0, min_links=0, idle_s=0.0)
    plan = plan_links(LinkInputs(SELF, NOW, peers), policy)
    # Each bucket keeps its linked peer; nothing else (no reason, all idle).
    assert set(plan.keep) == linked and not plan.link
    assert all(plan.why[pid] == "bucket" for pid in plan.keep)
    tight = plan_links(LinkInputs(SELF, NOW, peers), replace(policy, max_links=2))
    nearest = sorted(by_bucket, reverse=True)[:2]
    assert {bucket(SELF, pid) for pid in tight.keep} == set(nearest)


def test_a_small_swarm_links_everyone_and_random_picks_follow_the_seed() -> None:
    peers = [_peer(f"n{i}") for i in range(5)]
    plan = plan_links(LinkInputs(SELF, NOW, peers), LinkPolicy(per_bucket=0))
    assert set(plan.link) == {p.peer_id for p in peers}  # below min_links: all of them
    many = [_peer(f"n{i}") for i in range(200)]
    policy = LinkPolicy(per_bucket=0, min_links=0, random_links=3)
    picks = {plan_links(LinkInputs(SELF, NOW, many, seed=s), policy).link for s in range(8)}
    assert len(picks) > 1 and all(len(p) == 3 for p in picks)  # seeds differ, counts hold


def test_dht_keys_match_libp2p() -> None:
    from libp2p import generate_new_ed25519_identity
    from libp2p.kad_dht.routing_table import peer_id_to_key
    from libp2p.peer.id import ID

    pid = ID.from_pubkey(generate_new_ed25519_identity().public_key)
    assert dht_key(pid.to_base58()) == peer_id_to_key(pid)
    assert bucket(pid.to_base58(), pid.to_base58()) == 256
