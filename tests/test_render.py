"""swarm status as text: failed models, backend circuits and routing are shown, keys never."""

from __future__ import annotations

from node.cli.render import model_rows, models_text, result_text, status_text
from node.jobs.fairness import FairnessConfig, Ledger, Who
from protocols import Priority, Result


def test_status_shows_failed_models_backends_and_routing() -> None:
    body = {
        "hardware": {},
        "models": [{"name": "llm", "task": "text-generation", "runner": "openai-compat"}],
        "view": {
            "models_failed": {"gone": "cannot connect to the backend"},
            "runners": {
                "llm": {
                    "breaker": "open",
                    "in_flight": 1,
                    "max_concurrency": 8,
                    "keys": [{"label": "key#1", "uses": 3}, {"label": "key#2", "uses": 2}],
                    "mode": "api",
                },
                "emb": {"batching": {"calls": 4, "rows": 10}},
            },
            "routing": {
                "strategy": "least-loaded",
                "failovers": 2,
                "peer_breakers": {"12D3KooWabcdefgh12345678": {"state": "open"}},
            },
            "verification": {
                "rate": 0.05,
                "checks": 12,
                "verified_jobs": 1,
                "verdicts": {"agree": 11, "disagree": 2},
                "peers": {
                    "12D3KooWliarliarLIAR0001": {
                        "strikes": 2,
                        "checked": 4,
                        "held_back": True,
                        "held_for_s": 299.5,
                    },
                    "12D3KooWhonesthonest0002": {"strikes": 0, "checked": 9, "held_back": False},
                },
            },
        },
    }
    text = status_text("me", body)
    lines = [" ".join(line.split()) for line in text.splitlines()]  # spacing is the table's
    assert "not loaded gone: cannot connect to the backend" in lines
    assert "backend llm: circuit open, in flight 1/8, keys key#1:3 key#2:2, api mode" in lines
    assert "backend emb: batched 4 calls, mean 2.5 rows" in lines
    assert "routing least-loaded, 2 failovers, peers held back: 12345678 open" in lines
    assert any(line.startswith("llm text-generation openai-compat") for line in lines)
    verification = " ".join(lines[lines.index(next(x for x in lines if "checks 5%" in x)) :])
    assert "checks 5% of routed jobs: 12 checks, 1 verify jobs" in verification
    assert "agree/disagree/unsure 11/2/0" in verification
    assert "held back for wrong answers: LIAR0001 (2 strikes in 4, 299.5 s left)" in verification
    assert "0002" not in verification
    assert all(len(line) <= 80 for line in text.splitlines())


def test_result_says_who_served_after_how_many_attempts() -> None:
    meta = {"served_by": "B", "forwarded_by": "A", "attempts": 2, "took_ms": 12.5}
    text = result_text(Result("r1", {}, {**meta, "run_ms": 3.5, "queue_ms": 0.1}))
    assert text.splitlines() == [
        "served by B (? on ?)",
        "forwarded by A, after 2 attempts",
        "ran 3.5 ms, queued 0.1 ms; 12.5 ms in all",
    ]
    alone = result_text(Result("r2", {}, {"served_by": "B", "runner": "fake", "device": "cpu"}))
    assert alone.splitlines() == ["served by B (fake on cpu)", "ran ? ms, queued ? ms"]
    verified = {
        "verify": 1,
        "verify_ran": 2,
        "verify_verdict": "agree",
        "verify_nodes": "12D3KooWAAAAAAAAaaaaaaaa,12D3KooWBBBBBBBBbbbbbbbb",
        "verify_min_cosine": 0.999998,
    }
    lines = result_text(Result("r3", {}, verified)).splitlines()
    assert "verify: agree (2 of 2 ran: aaaaaaaa bbbbbbbb), lowest cosine 0.999998" in lines


def test_models_table_joins_this_node_and_its_peers() -> None:
    body = {
        "models": [{"name": "echo", "task": "fake", "runner": "fake", "device": "none"}],
        "view": {
            "peers": [
                {"peer_id": "12D3KooWpeerAAAAAAAA", "status": "linked", "models": ["Echo", "big"]},
                {"peer_id": "12D3KooWpeerBBBBBBBB", "status": "unreachable", "models": ["big"]},
            ]
        },
    }
    rows = model_rows(body)
    assert [(r["model"], len(r["peers"]), r["local"] is not None) for r in rows] == [
        ("big", 1, False),
        ("echo", 1, True),
    ]
    lines = [line.split() for line in models_text(rows).splitlines()]
    assert lines[0] == ["MODEL", "HERE", "PEERS", "CONTENT", "SIZE", "PROVIDERS"]
    assert ["echo", "fake", "fake/none", "1:", "AAAAAAAA", "-", "-", "0"] in lines
    assert ["big", "-", "1:", "AAAAAAAA", "-", "-", "0"] in lines


def test_models_table_shows_content_ids_sizes_and_provider_counts() -> None:
    cid = "QmWge1bPigWgL4Yo5uEDswznLJUwc8dCFj8SFjCSV1Q5nQ"
    body = {
        "models": [{"name": "effnet", "task": "classify", "runner": "openvino", "content": cid}],
        "view": {
            "content": {"shares": [{"content": cid, "size": 18655608}], "providers": {cid: 2}},
            "peers": [
                {
                    "peer_id": f"12D3KooWpeer{c * 8}",
                    "status": "linked",
                    "models": ["effnet"],
                    "model_content": {"effnet": cid},
                }
                for c in "AB"
            ],
        },
    }
    [row] = model_rows(body)
    assert (row["content"], row["size"], row["providers"]) == (cid, 18655608, 3)  # 2 and us
    text = models_text([row])
    assert "18.7 MB" in text and f"{cid[:12]}~" in text  # 80 columns: the id cut short


def test_status_shows_each_peers_share_in_80_columns() -> None:
    ledger = Ledger(FairnessConfig(top=3), own=("gateway",))
    peers = [f"12D3KooW{c * 44}" for c in "abcde"]
    for i, peer in enumerate(peers):
        for _ in range(10 * (5 - i)):
            ledger.depart(ledger.arrive(Who(peer, peer), Priority.NORMAL, 0.0, 1), "ok", 0.0)
    ledger.depart(
        ledger.arrive(Who(peers[0], peers[0]), Priority.NORMAL, 0.0, 1), "refused", 0.0, "queued"
    )
    for _ in range(4):
        ledger.arrive(Who(peers[0], peers[0]), Priority.HIGH, 0.0, 1)
    ledger.arrive(Who("gateway", "gateway"), Priority.NORMAL, 0.0, 1)
    body = {"hardware": {}, "view": {"fairness": ledger.describe(0.0, {peers[0]: 12}, {})}}
    text = status_text("me", body)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "fairness on, 6 peers tracked, 1 refused, over budget: queued 1, high 3" in lines
    assert "PEER W QUEUED IN FLIGHT SERVED REFUSED OVER BUDGET SHARE FAIR" in lines
    # a asked most lately; its share of the work beside the one its weight gives it
    # among those with work (five peers of weight 1 and the gateway, of 4).
    assert f"{peers[0][-12:]} 1 12 4 50 1 4 33% 11%" in lines
    assert f"{peers[0][-12:]} over budget: queued 1, high 3" in lines
    assert any(line.startswith("3 other ") for line in lines)  # the rest, summed
