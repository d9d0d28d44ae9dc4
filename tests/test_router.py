"""The router's decisions and the per-peer breakers, driven by hand-built peer tables.

Both are pure (a seeded rng and a hand-moved clock), so every test here replays
exactly; the property tests feed random tables, loads, breakers and requests.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bootstrap.table import PeerTable, RecordVerified, Unreachable, apply, live_peers
from capabilities.record import Load
from node.jobs.peer_health import PeerBreakers
from node.jobs.router import (
    Candidate,
    LocalNode,
    Router,
    RouterConfig,
    RouteRequest,
    Strategy,
    Weights,
)
from protocols import Priority
from protocols.config import Table
from protocols.errors import ConfigError
from protocols.resilience import BreakerState
from runners.base import ModelInfo, TextSpec

SELF = "self-node"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


NOW = 1.0  # the clock's start, and when the test tables' reports came


def entry(
    name: str = "m", task: str = "embeddings", device: str = "CPU", precision: str = "fp32"
) -> dict[str, Any]:
    return {"name": name, "task": task, "device": device, "precision": precision, "max_batch": 1}


def load(
    high: int = 0,
    normal: int = 0,
    low: int = 0,
    in_flight: int = 0,
    ewma: float | None = None,
    tps: float | None = None,
) -> dict[str, Any]:
    return {
        "queue_depth": {"high": high, "normal": normal, "low": low},
        "in_flight": in_flight,
        "ewma_latency_ms": ewma,
        "tokens_per_s": tps,
    }


def table_of(peers: Mapping[str, Mapping[str, Any]]) -> PeerTable:
    table = PeerTable()
    for pid, body in peers.items():
        table = apply(table, RecordVerified(pid, 1, body, at=NOW))
    return table


def body(
    *models: dict[str, Any], load_: dict[str, Any] | None = None, circuits: Any = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"models": list(models or [entry()]), "load": load_ or load()}
    if circuits is not None:
        out["circuits"] = circuits
    return out


def router(clock: Clock | None = None, seed: int = 7, **config: Any) -> Router:
    return Router(SELF, RouterConfig(**config), rng=random.Random(seed), clock=clock or Clock())


def info(name: str = "m", device: str = "CPU") -> ModelInfo:
    return ModelInfo(name, "embeddings", "fake", device, "fp32", 1, (TextSpec("text", 8, 1000),))


def ids(plan: Sequence[Candidate]) -> list[str]:
    return [c.peer_id for c in plan]


# ---------------------------------------------------------------------------
# who qualifies


def test_candidates_serve_the_model_task_precision_and_device_asked() -> None:
    table = table_of(
        {
            "a": body(entry("m")),
            "b": body(entry("m", task="text-generation", device="cuda:0", precision="fp16")),
            "c": body(entry("other")),
            "d": body(entry("M", device="GPU.0")),
        }
    )
    r = router(max_attempts=10)

    def plan(**ask: Any) -> set[str]:
        return set(ids(r.plan(table, None, RouteRequest("m", **ask), {})))

    assert plan() == {"a", "b", "d"}  # the name is compared case-insensitively
    assert plan(task="Embeddings") == {"a", "d"}
    assert plan(precision="FP16") == {"b"}
    assert plan(device="CUDA") == {"b"}  # a prefix of "cuda:0"
    assert plan(device="gpu") == {"d"}
    assert plan(device="cpu", task="embeddings") == {"a"}
    assert plan(device="npu") == set()
    chosen = r.plan(table, None, RouteRequest("M", device="cuda"), {})
    assert [(c.model, c.device, c.local) for c in chosen] == [("m", "cuda:0", False)]


def test_unlinked_excluded_and_open_circuit_peers_are_never_chosen() -> None:
    table = table_of(
        {
            "a": body(),
            "b": body(),
            "c": body(circuits={"M": "open"}),  # its backend for that model is down
            "d": body(),
            "e": body(circuits={"other": "open"}),
        }
    )
    table = apply(table, Unreachable("d", "dial failed", at=2.0))
    r = router(max_attempts=10)
    for _ in range(50):
        got = ids(r.plan(table, None, RouteRequest("m", exclude=frozenset({"b"})), {}))
        assert sorted(got) == ["a", "e"]


def test_a_half_open_backend_circuit_counts_against_a_peer() -> None:
    table = table_of({"a": body(circuits={"m": "half-open"}), "b": body()})
    r = router()
    for _ in range(20):
        assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["b", "a"]


def test_peer_breaker_open_then_one_probe_placed_last() -> None:
    clock = Clock()
    r = router(clock, peer_failures=2, peer_cooldown_s=10.0, max_attempts=5)
    table = table_of({"a": body(), "b": body(), "c": body()})
    r.breakers.failure("a")
    assert "a" in ids(r.plan(table, None, RouteRequest("m"), {}))  # one failure: still closed
    r.breakers.failure("a")
    for _ in range(20):
        assert sorted(ids(r.plan(table, None, RouteRequest("m"), {}))) == ["b", "c"]
    clock.now += 10.0
    plan = r.plan(table, None, RouteRequest("m"), {})
    assert ids(plan)[-1] == "a" and plan[-1].probe and not any(c.probe for c in plan[:-1])
    # Nothing else left: the probe is the whole plan.
    alone = r.plan(table, None, RouteRequest("m", exclude=frozenset({"b", "c"})), {})
    assert ids(alone) == ["a"] and alone[0].probe
    # The probe is out: no second one until its verdict.
    assert r.breakers.admit("a") is None
    assert r.plan(table, None, RouteRequest("m", exclude=frozenset({"b", "c"})), {}) == []
    r.breakers.success("a")
    assert ids(r.plan(table, None, RouteRequest("m", exclude=frozenset({"b", "c"})), {})) == ["a"]


def test_a_probe_falls_off_when_healthy_peers_fill_the_attempts() -> None:
    clock = Clock()
    r = router(clock, peer_failures=1, peer_cooldown_s=1.0, max_attempts=2)
    table = table_of({"a": body(), "b": body(), "c": body()})
    r.breakers.failure("a")
    clock.now += 1.0
    assert sorted(ids(r.plan(table, None, RouteRequest("m"), {}))) == ["b", "c"]


def test_at_most_max_attempts_and_no_duplicates() -> None:
    table = table_of({p: body() for p in "abcdefgh"})
    r = router(max_attempts=3)
    local = LocalNode([info()])
    for _ in range(30):
        got = ids(r.plan(table, local, RouteRequest("m"), {}))
        assert len(got) == 3 and len(set(got)) == 3


# ---------------------------------------------------------------------------
# the local node


def test_local_node_is_a_candidate_and_first_with_local_first() -> None:
    table = table_of({p: body() for p in "abc"})
    r = router(max_attempts=4)
    local = LocalNode([info("m", "CPU")], Load(in_flight=1))
    plan = r.plan(table, local, RouteRequest("M"), {})
    mine = [c for c in plan if c.local]
    assert len(mine) == 1 and mine[0].peer_id == SELF and mine[0].model == "m"
    for _ in range(30):
        first = r.plan(table, local, RouteRequest("m", strategy=Strategy.LOCAL_FIRST), {})[0]
        assert first.local
    # Not when it does not serve the model, nor once tried.
    assert not any(c.local for c in r.plan(table, LocalNode([info("x")]), RouteRequest("m"), {}))
    tried = RouteRequest("m", strategy=Strategy.LOCAL_FIRST, exclude=frozenset({SELF}))
    assert not any(c.local for c in r.plan(table, local, tried, {}))


def test_local_first_gives_way_when_the_local_node_is_saturated() -> None:
    table = table_of({"a": body()})
    r = router(strategy="local-first", saturation=4)
    busy = LocalNode([info()], Load(queue_depth={"high": 0, "normal": 3, "low": 0}, in_flight=1))
    assert ids(r.plan(table, busy, RouteRequest("m"), {})) == ["a", SELF]
    calm = LocalNode([info()], Load(in_flight=3))
    assert ids(r.plan(table, calm, RouteRequest("m"), {})) == [SELF, "a"]


def test_local_node_wins_a_tie_by_having_no_hop() -> None:
    table = table_of({"a": body()})
    r = router()
    for _ in range(20):
        assert ids(r.plan(table, LocalNode([info()]), RouteRequest("m"), {}))[0] == SELF


def test_local_backend_circuit_open_leaves_it_out() -> None:
    r = router()
    table = table_of({"a": body()})
    assert ids(
        r.plan(table, LocalNode([info()], circuits={"M": "open"}), RouteRequest("m"), {})
    ) == ["a"]
    half = LocalNode([info()], circuits={"m": "half-open"})
    assert ids(r.plan(table, half, RouteRequest("m"), {})) == ["a", SELF]


# ---------------------------------------------------------------------------
# strategies


def test_identical_peers_take_turns_for_the_first_pick() -> None:
    peers = [f"p{i:02d}" for i in range(10)]
    table = table_of({p: body() for p in peers})
    r = router(seed=1)
    firsts = Counter(r.plan(table, None, RouteRequest("m"), {})[0].peer_id for _ in range(1000))
    assert firsts == {p: 100 for p in peers}  # ties take turns: no herding, no luck


def test_least_loaded_never_puts_a_clearly_busier_peer_first() -> None:
    peers = {f"p{i}": body() for i in range(6)}
    peers["busy"] = body(load_=load(normal=5, in_flight=2))
    table = table_of(peers)
    r = router(seed=2, max_attempts=10)
    for _ in range(300):
        plan = r.plan(table, None, RouteRequest("m"), {})
        assert plan[0].peer_id != "busy" and plan[-1].peer_id == "busy"
    two = table_of({"idle": body(), "busy": body(load_=load(normal=1))})
    assert all(ids(r.plan(two, None, RouteRequest("m"), {})) == ["idle", "busy"] for _ in range(50))


def test_our_own_in_flight_calls_count_before_heartbeats_catch_up() -> None:
    table = table_of({"a": body(), "b": body()})
    r = router()
    for _ in range(20):
        assert ids(r.plan(table, None, RouteRequest("m"), {"a": 2})) == ["b", "a"]


def test_queue_depth_is_weighed_by_the_request_priority() -> None:
    table = table_of({"lowq": body(load_=load(low=4)), "highq": body(load_=load(high=2))})
    r = router()
    high = RouteRequest("m", priority=Priority.HIGH)
    low = RouteRequest("m", priority=Priority.LOW)
    assert ids(r.plan(table, None, high, {})) == ["lowq", "highq"]  # low work waits behind it
    assert ids(r.plan(table, None, low, {})) == ["highq", "lowq"]  # all four are ahead of it


def test_an_accelerator_is_preferred_when_no_device_is_asked() -> None:
    table = table_of({"cpu": body(entry(device="CPU")), "gpu": body(entry(device="cuda:0"))})
    r = router()
    assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["gpu", "cpu"]


def test_round_robin_cycles_per_model() -> None:
    table = table_of({"a": body(entry("m"), entry("n")), "b": body(entry("m")), "c": body()})
    r = router(strategy=Strategy.ROUND_ROBIN, max_attempts=3)
    firsts = [r.plan(table, None, RouteRequest("m"), {})[0].peer_id for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["a", "b", "c"]
    assert ids(r.plan(table, None, RouteRequest("n"), {})) == ["a"]  # its own turn counter
    assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["b", "c", "a"]


def test_round_robin_failover_replans_do_not_take_a_turn() -> None:
    table = table_of({"a": body(), "b": body()})
    r = router(strategy=Strategy.ROUND_ROBIN)
    for _ in range(3):  # each job tries a first, a fails, the re-plan without it gives b
        assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["a", "b"]
        assert ids(r.plan(table, None, RouteRequest("m", exclude=frozenset({"a"})), {})) == ["b"]
        assert ids(r.plan(table, None, RouteRequest("m"), {}))[0] == "b"  # the next job's turn


@pytest.mark.parametrize("strategy", list(Strategy))
def test_preview_answers_the_next_plan_and_changes_nothing(strategy: Strategy) -> None:
    busy = load(normal=4, in_flight=2)
    table = table_of({"a": body(), "b": body(load_=busy), "c": body(), "d": body(entry("x"))})
    local = LocalNode([info()], Load(queue_depth={"normal": 1}))
    r = router(strategy=strategy, max_attempts=2)
    for _ in range(5):  # previews repeat, and each equals the plan that follows it
        first = r.preview(table, local, RouteRequest("m"), {})
        again = r.preview(table, local, RouteRequest("m"), {})
        assert first == again
        assert first.order == r.plan(table, local, RouteRequest("m"), {})
        assert first.chosen == first.order[0]
    # Every eligible node, best score first, even past max_attempts; "d" serves another.
    ranked = first.candidates
    assert sorted(ids(ranked)) == ["a", "b", "c", SELF]
    assert [c.score for c in ranked] == sorted(c.score for c in ranked)
    assert ranked[-1].peer_id == "b"  # the busiest
    assert r.preview(table, local, RouteRequest("absent"), {}).chosen is None


def test_best_performance_prefers_the_lower_latency_then_the_faster() -> None:
    table = table_of(
        {
            "slow": body(load_=load(ewma=100.0)),
            "fast": body(load_=load(ewma=20.0, normal=3)),
            "new": body(load_=load()),  # no latency yet: after the known ones
            "twin": body(load_=load(ewma=20.0, normal=3, tps=50.0)),
        }
    )
    r = router(strategy="best-performance", max_attempts=4)
    assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["twin", "fast", "slow", "new"]
    # Same latency: the local node has no hop to pay.
    local = LocalNode([info()], Load(ewma_latency_ms=20.0, tokens_per_s=50.0))
    assert ids(r.plan(table, local, RouteRequest("m"), {}))[0] == SELF


def test_a_request_strategy_overrides_the_default() -> None:
    table = table_of({"a": body(load_=load(ewma=50.0)), "b": body(load_=load(ewma=10.0, normal=9))})
    r = router()
    assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["a", "b"]
    best = RouteRequest("m", strategy=Strategy.BEST_PERFORMANCE)
    assert ids(r.plan(table, None, best, {})) == ["b", "a"]


def test_junk_loads_and_models_in_a_record_do_not_break_planning() -> None:
    junk_load = {"queue_depth": {"high": "x", "normal": -5, "low": True}, "in_flight": None}
    table = table_of(
        {
            "a": {"models": [entry(), 3, {"name": 7}], "load": junk_load, "circuits": [1]},
            "b": {"models": "m", "load": 4},
            "c": {"models": [{"name": "m"}], "load": {"ewma_latency_ms": float("nan")}},
        }
    )
    r = router(max_attempts=5, strategy="best-performance")
    assert sorted(ids(r.plan(table, None, RouteRequest("m"), {}))) == ["a", "c"]
    assert ids(r.plan(table, None, RouteRequest("m", device="cpu"), {})) == ["a"]


# ---------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "fastest"},
        {"max_attempts": 0},
        {"max_attempts": True},
        {"saturation": 0},
        {"peer_failures": 0},
        {"peer_cooldown_s": -1.0},
        {"peer_cooldown_s": 10.0, "peer_max_cooldown_s": 5.0},
        {"peer_max_cooldown_s": float("inf")},
    ],
)
def test_router_config_refuses_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="router"):
        RouterConfig(**bad)


def test_weights_and_requests_are_validated() -> None:
    with pytest.raises(ConfigError, match="hop"):
        Weights(hop=-1.0)
    with pytest.raises(ConfigError, match="latency_per_s"):
        Weights(latency_per_s=float("nan"))
    with pytest.raises(ValueError, match="model"):
        RouteRequest("")
    with pytest.raises(ValueError):
        RouteRequest("m", strategy="fastest")  # type: ignore[arg-type]
    assert RouteRequest("m", strategy="round-robin").strategy is Strategy.ROUND_ROBIN  # type: ignore[arg-type]
    assert RouterConfig(strategy="local-first").strategy is Strategy.LOCAL_FIRST  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# paths: direct, relayed, and intermediaries (node.reach)


def test_a_relayed_peer_scores_below_a_direct_one_of_the_same_load() -> None:
    table = table_of({"direct": body(), "relayed": body(), "punched": body()})
    r = router(max_attempts=3)
    paths = {"relayed": "relayed", "punched": "hole-punched"}
    for _ in range(50):
        plan = r.plan(table, None, RouteRequest("m"), {}, paths)
        assert plan[-1].peer_id == "relayed" and plan[-1].path == "relayed"
    by_id = {c.peer_id: c for c in r.preview(table, None, RouteRequest("m"), {}, paths).candidates}
    assert by_id["relayed"].score == by_id["direct"].score + Weights().relayed
    assert by_id["punched"].score == by_id["direct"].score  # a punched connection is direct
    assert by_id["punched"].path == "hole-punched" and by_id["direct"].path == "direct"
    # An idle relayed peer still beats a clearly busy direct one.
    busy = table_of({"direct": body(load_=load(normal=3)), "relayed": body()})
    assert ids(r.plan(busy, None, RouteRequest("m"), {}, {"relayed": "relayed"}))[0] == "relayed"


def test_large_requests_try_every_direct_candidate_before_a_relayed_one() -> None:
    table = table_of({"busy": body(load_=load(normal=3)), "relayed": body()})
    r = router(relay_max_bytes=1000)
    paths = {"relayed": "relayed"}
    small, large = RouteRequest("m", size_bytes=1000), RouteRequest("m", size_bytes=1001)
    assert ids(r.plan(table, None, small, {}, paths)) == ["relayed", "busy"]
    for strategy in Strategy:
        query = RouteRequest("m", size_bytes=5000, strategy=strategy)
        assert ids(r.plan(table, None, query, {}, paths)) == ["busy", "relayed"], strategy
    assert ids(r.plan(table, None, large, {}, paths)) == ["busy", "relayed"]
    # Past max_attempts, the relayed one falls off while direct ones remain.
    many = table_of({"relayed": body(), **{f"d{i}": body(load_=load(normal=5)) for i in range(3)}})
    assert "relayed" not in ids(r.plan(many, None, large, {}, paths))
    # With only relayed peers, a large request still goes.
    only = table_of({"relayed": body()})
    assert ids(r.plan(only, None, large, {}, paths)) == ["relayed"]


def forwarder(*models: str, load_: dict[str, Any] | None = None) -> dict[str, Any]:
    """A linked peer serving "other" whose record says it forwards ``models``."""
    return {**body(entry("other"), load_=load_), "forwards": list(models)}


def test_intermediaries_are_candidates_only_when_no_provider_is() -> None:
    r = router(max_attempts=4)
    table = table_of({"i1": forwarder("m"), "i2": forwarder("M", load_=load(normal=2))})
    plan = r.plan(table, None, RouteRequest("m"), {})
    assert ids(plan) == ["i1", "i2"] and all(c.path == "via" for c in plan)
    assert plan[0].score == pytest.approx(Weights().hop + Weights().forwarded)
    # A job forwarded to us already goes to a provider or nowhere: no second relay hop.
    assert r.plan(table, None, RouteRequest("m", via=False), {}) == []
    # A provider, linked or local, and the intermediaries are left out.
    both = table_of({"i1": forwarder("m"), "p": body()})
    assert ids(r.plan(both, None, RouteRequest("m"), {})) == ["p"]
    assert ids(r.plan(table, LocalNode([info()]), RouteRequest("m"), {})) == [SELF]
    # Once the provider was tried (failed over), intermediaries take their turn.
    tried = RouteRequest("m", exclude=frozenset({"p"}))
    assert ids(r.plan(both, None, tried, {})) == ["i1"]
    # An intermediary whose breaker is open is not asked; nor one that serves other models only.
    for _ in range(3):
        r.breakers.failure("i1")
    assert ids(r.plan(table, None, RouteRequest("m"), {})) == ["i2"]
    assert r.plan(table, None, RouteRequest("x"), {}) == []


# ---------------------------------------------------------------------------
# peer breakers


def test_peer_breaker_opens_half_opens_backs_off_and_closes() -> None:
    clock = Clock()
    b = PeerBreakers(failures=3, cooldown_s=10.0, max_cooldown_s=35.0, clock=clock)
    assert b.state("p") == BreakerState.CLOSED and b.admit("p") is None
    b.failure("p")
    b.failure("p")
    assert b.state("p") == BreakerState.CLOSED and b.admit("p") is None
    b.failure("p")
    assert b.state("p") == BreakerState.OPEN
    assert b.admit("p") == pytest.approx(10.0)
    clock.now += 10.0
    assert b.state("p") == BreakerState.HALF_OPEN
    assert b.admit("p") is None and b.probing("p")  # the one probe
    assert b.admit("p") is not None  # a second one waits for its verdict
    b.failure("p")  # the probe failed: twice the cooldown
    assert b.cooldown("p") == 20.0 and b.state("p") == BreakerState.OPEN
    clock.now += 19.0
    assert b.state("p") == BreakerState.OPEN
    clock.now += 1.0
    assert b.admit("p") is None
    b.failure("p")
    assert b.cooldown("p") == 35.0  # capped
    clock.now += 35.0
    assert b.admit("p") is None
    b.abandon("p")  # cancelled: no verdict, the slot is free again
    assert not b.probing("p") and b.admit("p") is None
    b.success("p")
    assert b.state("p") == BreakerState.CLOSED and b.cooldown("p") == 10.0 and len(b) == 0


def test_peer_breakers_describe_for_status() -> None:
    clock = Clock()
    b = PeerBreakers(failures=1, cooldown_s=4.0, max_cooldown_s=60.0, clock=clock)
    b.failure("q")
    clock.now += 1.5
    assert b.describe() == {
        "q": {
            "state": "open",
            "failures": 1,
            "cooldown_s": 4.0,
            "retry_in_s": 2.5,
            "probing": False,
        }
    }
    assert b.state("q") == BreakerState.OPEN  # describing changed nothing
    r = router(clock, strategy="round-robin", peer_failures=1)
    r.breakers.failure("z")
    status = r.describe()
    assert status["strategy"] == "round-robin" and status["max_attempts"] == 3
    assert status["peers"]["z"]["state"] == "open"


def test_peer_breakers_memory_is_bounded() -> None:
    clock = Clock()
    b = PeerBreakers(1, 1.0, 8.0, clock, max_peers=4, forget_after_s=100.0)
    for i in range(50):
        clock.now += 1.0
        b.failure(f"p{i}")
        assert len(b) <= 4
    assert b.state("p49") == BreakerState.OPEN  # the newest are kept
    clock.now += 101.0
    b.failure("fresh")
    assert len(b) == 1


@pytest.mark.parametrize(
    "bad",
    [(0, 1.0, 2.0), (1, -1.0, 2.0), (1, 3.0, 2.0)],
)
def test_peer_breakers_refuse_bad_settings(bad: tuple[int, float, float]) -> None:
    with pytest.raises(ConfigError):
        PeerBreakers(*bad, clock=Clock())


# ---------------------------------------------------------------------------
# properties

NAMES = ["m", "M", "n"]
PEERS = [f"p{i}" for i in range(8)]
junk = st.one_of(st.none(), st.text(max_size=2), st.floats(), st.booleans(), st.integers(-3, 9))
model_entries = st.builds(
    entry,
    name=st.sampled_from(["m", "M", "m", "n"]),
    task=st.sampled_from(["embeddings", "embeddings", "text-generation"]),
    device=st.sampled_from(["CPU", "cuda:0", "GPU.1"]),
    precision=st.sampled_from(["fp32", "fp16"]),
)
loads = st.one_of(
    st.builds(
        load,
        high=st.integers(0, 5),
        normal=st.integers(0, 5),
        low=st.integers(0, 5),
        in_flight=st.integers(0, 5),
        ewma=st.none() | st.floats(0, 500),
        tps=st.none() | st.floats(0, 100),
    ),
    st.dictionaries(st.sampled_from(["queue_depth", "in_flight", "ewma_latency_ms"]), junk),
)
bodies = st.fixed_dictionaries(
    {"models": st.lists(model_entries, min_size=1, max_size=3)},
    optional={
        "load": loads,  # absent: its load is unknown, and it still qualifies
        "circuits": st.dictionaries(
            st.sampled_from(NAMES), st.sampled_from(["open", "closed", "half-open"])
        ),
    },
)


def maybe(values: list[str]) -> st.SearchStrategy[str | None]:
    """None more often than not: most requests do not narrow by that field."""
    return st.sampled_from([None] * (len(values) + 1) + values)


requests = st.builds(
    RouteRequest,
    model=st.sampled_from(["m", "m", "M", "n"]),
    task=maybe(["embeddings", "EMBEDDINGS", "text-generation"]),
    precision=maybe(["fp32", "FP16"]),
    device=maybe(["cpu", "CUDA", "gpu", "GPU.1"]),
    strategy=st.none() | st.sampled_from(list(Strategy)),
    priority=st.sampled_from(list(Priority)),
    exclude=st.frozensets(st.sampled_from([*PEERS, SELF]), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    peers=st.dictionaries(st.sampled_from(PEERS), bodies, min_size=1, max_size=8),
    down=st.frozensets(st.sampled_from(PEERS), max_size=2),
    failures=st.dictionaries(st.sampled_from(PEERS), st.integers(0, 4), max_size=3),
    elapsed=st.floats(0, 30),
    local_models=st.none() | st.lists(st.sampled_from(NAMES), max_size=2),
    request=requests,
    ours=st.dictionaries(st.sampled_from(PEERS), st.integers(-2, 5)),
    service=st.dictionaries(
        st.sampled_from(PEERS), st.sampled_from([0.0, 5e-324, 1.0, 20.0, 1e300, float("nan")])
    ),
    then=st.dictionaries(st.sampled_from(PEERS), st.integers(-2, 9)),
    max_attempts=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_plan_properties(
    peers: dict[str, dict[str, Any]],
    down: frozenset[str],
    failures: dict[str, int],
    elapsed: float,
    local_models: list[str] | None,
    request: RouteRequest,
    ours: dict[str, int],
    service: dict[str, float],
    then: dict[str, int],
    max_attempts: int,
    seed: int,
) -> None:
    clock = Clock()
    table = table_of(peers)
    for pid in down:
        table = apply(table, Unreachable(pid, "gone", at=2.0))
    r = router(clock, seed=seed, max_attempts=max_attempts, peer_failures=2, peer_cooldown_s=10.0)
    for pid, n in failures.items():
        for _ in range(n):
            r.breakers.failure(pid)
    clock.now += elapsed
    local = None if local_models is None else LocalNode([info(n) for n in local_models])

    plan = r.plan(table, local, request, ours, None, service, then)
    event(f"plan of {len(plan)}, probe: {any(c.probe for c in plan)}")

    assert len(plan) <= max_attempts
    assert len(set(ids(plan))) == len(plan)
    assert all(math.isfinite(c.score) for c in plan)
    assert not any(c.probe for c in plan[:-1])  # one probe at most, last
    live = {p.peer_id: p for p in live_peers(table)}
    for c in plan:
        assert c.peer_id not in request.exclude
        assert c.model.casefold() == request.model.casefold()
        if request.device is not None:
            assert c.device.casefold().startswith(request.device.casefold())
        if c.local:
            assert c.peer_id == SELF and local is not None
            continue
        assert c.peer_id in live and c.peer_id not in down
        assert r.breakers.state(c.peer_id) != BreakerState.OPEN
        assert c.probe == (r.breakers.state(c.peer_id) == BreakerState.HALF_OPEN)
        body_ = live[c.peer_id].body
        assert body_ is not None
        circuits = body_.get("circuits") or {}
        assert all(s != "open" for k, s in circuits.items() if k.casefold() == c.model.casefold())
    # Someone healthy qualifies: the plan is not empty.
    healthy = [
        pid
        for pid in live
        if pid not in request.exclude
        and r.breakers.state(pid) == BreakerState.CLOSED
        and any(
            m["name"].casefold() == request.model.casefold()
            and (request.task is None or m["task"].casefold() == request.task.casefold())
            and (
                request.precision is None
                or m["precision"].casefold() == request.precision.casefold()
            )
            and (
                request.device is None
                or m["device"].casefold().startswith(request.device.casefold())
            )
            for m in peers[pid]["models"]
        )
        and all(
            s != "open"
            for k, s in (peers[pid].get("circuits") or {}).items()
            if k.casefold() == request.model.casefold()
        )
    ]
    if healthy:
        assert plan


def test_router_config_from_a_config_table() -> None:
    data = {
        "strategy": "best-performance",
        "max_attempts": 2,
        "peer_cooldown_s": 2,
        "weights": {"hop": 1.5, "relayed": 3},
        "relay_max_bytes": 65536,
    }
    config = RouterConfig.from_table(Table(data, "router"))
    assert config.strategy is Strategy.BEST_PERFORMANCE and config.max_attempts == 2
    assert config.relay_max_bytes == 65536
    assert config.peer_cooldown_s == 2.0 and config.weights == Weights(hop=1.5, relayed=3.0)
    assert RouterConfig.from_table(Table({}, "router")) == RouterConfig()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"strategy": "fastest"}, "router.strategy"),
        ({"max_attempts": 0}, "router.max_attempts"),
        ({"weights": {"hop": -1}}, "router.weights.hop"),
        ({"weights": {"hops": 1}}, "hops"),
        ({"retries": 1}, "retries"),
        ({"peer_cooldown_s": 10, "peer_max_cooldown_s": 5}, "router.peer_max_cooldown_s"),
        ({"relay_max_bytes": 0}, "router.relay_max_bytes"),
    ]
    for bad, named in cases:
        with pytest.raises(ConfigError, match=named):
            RouterConfig.from_table(Table(bad, "router"))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "success", "failure", "abandon", "wait"]),
            st.sampled_from(["a", "b"]),
            st.floats(0, 20),
        ),
        max_size=60,
    )
)
def test_peer_breaker_properties(steps: list[tuple[str, str, float]]) -> None:
    """Cooldowns stay in [base, cap]; never two probes out; open means refused."""
    clock = Clock()
    b = PeerBreakers(2, 3.0, 40.0, clock, max_peers=8)
    out: set[str] = set()  # peers with an admitted call and no verdict yet
    for op, peer, dt in steps:
        if op == "wait":
            clock.now += dt
        elif op == "admit":
            before, probing = b.state(peer), b.probing(peer)
            wait = b.admit(peer)
            if before == BreakerState.OPEN or probing:
                assert wait is not None and wait > 0
            if wait is None:
                out.add(peer)
        elif peer in out:
            out.discard(peer)
            getattr(b, op)(peer)
        assert 3.0 <= b.cooldown(peer) <= 40.0
        assert b.state(peer) != BreakerState.CLOSED or not b.probing(peer)


def test_an_old_load_report_fades_before_our_fresh_count() -> None:
    clock = Clock()
    table = table_of({"old": body(load_=load(in_flight=8)), "new": body(load_=load(in_flight=3))})
    r = router(clock)
    fresh = {c.peer_id: c.score for c in r.plan(table, None, RouteRequest("m"), {})}
    assert fresh["new"] < fresh["old"]  # 3 in flight beats 8
    # Ten seconds later (four half-lives) "old"'s report says little, while we know of
    # 2 calls of ours at "new" right now: our fresh count wins over stale reports.
    clock.now += 10.0
    later = r.plan(table, None, RouteRequest("m"), {"new": 2})
    assert later[0].peer_id == "old"
    scores = {c.peer_id: c.score for c in later}
    assert scores["old"] < scores["new"]


# ---------------------------------------------------------------------------
# least-loaded: our own calls, the others' reported work, service times


def test_a_report_counts_our_calls_of_then_and_the_rest_is_the_others() -> None:
    """Both peers reported 4 in flight, all of them ours then; "a" has just answered
    one. Taking our calls of now out of the report would leave a ghost job at "a",
    the very peer that just freed up; our calls of then leave none."""
    table = table_of({p: body(load_=load(normal=3, in_flight=4)) for p in "ab"})
    r = router()
    now, then = {"a": 3, "b": 4}, {"a": 4, "b": 4}
    for _ in range(10):
        plan = r.plan(table, None, RouteRequest("m"), now, None, None, then)
        assert ids(plan) == ["a", "b"]
    scores = {c.peer_id: c.score for c in plan}
    assert scores["b"] - scores["a"] == pytest.approx(1.0)
    # A report above our calls of then is the others' work there: it counts.
    busy = table_of({"a": body(load_=load(normal=5, in_flight=6)), "b": body()})
    for _ in range(10):
        assert ids(r.plan(busy, None, RouteRequest("m"), {"b": 3}, None, None, {"a": 2})) == [
            "b",
            "a",
        ]
    # The report's queued jobs are in its in_flight too: counted once, not twice.
    one = table_of({"q": body(load_=load(normal=3, in_flight=4))})
    (q,) = r.plan(one, None, RouteRequest("m"), {})
    assert q.score == pytest.approx(4 + Weights().hop)


def test_least_loaded_joins_the_shortest_of_our_queues() -> None:
    table = table_of({p: body() for p in "abcd"})
    r = router()
    ours = {"a": 2, "b": 1, "c": 3}  # nothing reported at any: our calls decide
    for _ in range(20):
        assert ids(r.plan(table, None, RouteRequest("m"), ours)) == ["d", "b", "a"]
    firsts = [r.plan(table, None, RouteRequest("m"), {"a": 1, "c": 1})[0].peer_id for _ in range(6)]
    assert firsts == ["b", "d", "b", "d", "b", "d"]  # the tied shortest take turns
    # A failover re-plan takes no turn.
    again = RouteRequest("m", exclude=frozenset({"b"}))
    assert ids(r.plan(table, None, again, {}))[0] in "acd"
    assert r.plan(table, None, RouteRequest("m"), {"a": 1, "c": 1})[0].peer_id == "b"


def test_a_slower_peer_takes_jobs_only_once_the_faster_ones_queue_enough() -> None:
    """Queues are scaled by each peer's time per job: a peer five times slower than
    the typical one is worth an idle slot only behind four jobs at the others."""
    table = table_of({p: body() for p in ("f1", "f2", "f3", "slow")})
    r = router()
    seen = {"f1": 20.0, "f2": 20.0, "f3": 20.0, "slow": 100.0}
    for n, first in ((0, "f"), (3, "f"), (5, "slow")):
        ours = {"f1": n, "f2": n, "f3": n}
        got = r.plan(table, None, RouteRequest("m"), ours, None, seen)[0].peer_id
        assert got.startswith(first), (n, got)
    # Without our own observations, the EWMA the records report serves.
    reported = table_of(
        {
            "f": body(load_=load(ewma=20.0)),
            "g": body(load_=load(ewma=20.0)),
            "slow": body(load_=load(ewma=100.0)),
        }
    )
    assert ids(r.plan(reported, None, RouteRequest("m"), {"f": 2, "g": 2}))[0] != "slow"
    # Ours win over a report: a peer we saw run fast is fast, whatever it said.
    fast = r.plan(reported, None, RouteRequest("m"), {"f": 2, "g": 2}, None, {"slow": 20.0})
    assert fast[0].peer_id == "slow"


def test_the_local_node_counts_its_own_load_exactly() -> None:
    table = table_of({"a": body()})
    r = router()
    busy = LocalNode([info()], Load(queue_depth={"high": 0, "normal": 2, "low": 0}, in_flight=3))
    assert ids(r.plan(table, busy, RouteRequest("m"), {"a": 2})) == ["a", SELF]  # 3 vs 2.5
    assert ids(r.plan(table, busy, RouteRequest("m"), {"a": 3})) == [SELF, "a"]  # 3 vs 3.5


# ---------------------------------------------------------------------------
# unknown load: a provider known but not linked (no heartbeats)


def unlinked(*models: dict[str, Any]) -> dict[str, Any]:
    """A record with no load: nobody reported how busy it is."""
    return {"models": list(models or [entry()])}


def test_a_provider_of_unknown_load_is_used_when_it_is_the_only_one() -> None:
    table = table_of({"u": unlinked()})
    assert live_peers(table)[0].load is None
    r = router()
    (only,) = r.plan(table, None, RouteRequest("m"), {})
    assert only.peer_id == "u"
    # Its score: the prior for others' work (none known to take a median of), a penalty.
    config = RouterConfig()
    w = config.weights
    assert only.score == pytest.approx(config.unknown_load + w.hop + w.unknown)
    assert r.plan(table, None, RouteRequest("m"), {}, None, None, {})[0].peer_id == "u"


def test_known_load_wins_ties_and_unknown_load_is_used_once_the_known_are_busy() -> None:
    table = table_of({"a": body(), "b": body(), "u": unlinked()})
    r = router(max_attempts=3)
    for _ in range(20):  # idle known peers beat an unknown one: not taken as idle
        assert ids(r.plan(table, None, RouteRequest("m"), {}))[-1] == "u"
    # Our calls count at it as anywhere; the known ones busy with ours, it goes first.
    assert ids(r.plan(table, None, RouteRequest("m"), {"a": 1, "b": 1}))[0] == "u"
    assert ids(r.plan(table, None, RouteRequest("m"), {"a": 1, "b": 1, "u": 1}))[-1] == "u"
    # Others' work reported at the known ones: the unknown one is assumed as busy as
    # their median, so it is not a refuge from a busy swarm, nor shunned in one.
    busy = table_of(
        {
            "a": body(load_=load(normal=1, in_flight=2)),
            "b": body(load_=load(normal=3, in_flight=4)),
            "c": body(load_=load(normal=5, in_flight=6)),
            "u": unlinked(),
        }
    )
    scores = {c.peer_id: c.score for c in r.preview(busy, None, RouteRequest("m"), {}).candidates}
    assert scores["u"] == pytest.approx(scores["b"] + Weights().unknown)
    assert ids(r.plan(busy, None, RouteRequest("m"), {})) == ["a", "b", "u"]  # before c


def test_the_unknown_load_prior_and_penalty_are_configurable() -> None:
    config = RouterConfig.from_table(
        Table({"unknown_load": 3, "weights": {"unknown": 0.25}}, "router")
    )
    assert config.unknown_load == 3.0 and config.weights.unknown == 0.25
    with pytest.raises(ConfigError, match="unknown_load"):
        RouterConfig(unknown_load=-1.0)
    with pytest.raises(ConfigError, match=r"router\.unknown_load"):
        RouterConfig.from_table(Table({"unknown_load": "x"}, "router"))
    table = table_of({"u": unlinked()})
    r = Router(SELF, config, rng=random.Random(1), clock=Clock())
    assert r.plan(table, None, RouteRequest("m"), {})[0].score == pytest.approx(3 + 0.5 + 0.25)


def test_speeds_within_twice_the_typical_count_as_typical() -> None:
    """A busy machine stretches one worker's jobs now, another's next: a peer seen
    1.75x slower is taken as typical (equal peers stay balanced, taking turns);
    one 5x slower is scaled (it waits for the others to queue 4 of ours)."""
    table = table_of({p: body() for p in "abc"})
    r = router()
    noisy = {"a": 20.0, "b": 35.0, "c": 20.0}
    firsts = [r.plan(table, None, RouteRequest("m"), {}, None, noisy)[0].peer_id for _ in range(6)]
    assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]
    scores = {
        c.peer_id: c.score
        for c in r.preview(table, None, RouteRequest("m"), {}, None, noisy).candidates
    }
    assert scores["a"] == scores["b"] == scores["c"]
    slow = {"a": 20.0, "b": 100.0, "c": 20.0}
    for n in (0, 3):
        got = r.plan(table, None, RouteRequest("m"), {"a": n, "c": n}, None, slow)
        assert got[0].peer_id != "b", n
    assert r.plan(table, None, RouteRequest("m"), {"a": 5, "c": 5}, None, slow)[0].peer_id == "b"
