"""The simulator's printed report and its plot (every figure from one run's results)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootstrap.dht import DhtConfig
from node.jobs.router import RouterConfig

from . import kademlia as kad
from .model import SimConfig
from .sizes import DIAL_BYTES

# The targets (issue 13, "Targets: Simulated").
REST_RATIO_MAX = 2.0  # per-node bytes at rest, largest size over smallest
FIRST_JOB_ROUNDS_MAX = 3  # DHT round trips to a new node's first routed job
LIVE_PCT_MIN = 99.9  # jobs that found a live provider under churn


def header(configs: list[SimConfig], sizes: Mapping[str, int]) -> str:
    c = configs[0]
    dht = DhtConfig()
    lines = [
        "simulate_swarm: the real peer table, router and link policy over a simulated "
        "network and clock",
        f"seed {c.seed}; same seed and arguments, same report",
        f"router: node.jobs.router.Router, default strategy {str(RouterConfig().strategy)!r}",
        f"links: at most {c.max_links} per node; link policy run every {c.policy_s:g} s",
        f"membership: heartbeat {c.heartbeat_s:g} s, dead after {c.dead_after_s:g} s",
        f"DHT (model): k={kad.K}, alpha={kad.ALPHA}, lock-step rounds; query timeout "
        f"{dht.query_timeout_s:g} s, refresh {dht.refresh_s:g} s, reprovide {dht.reprovide_s:g} s",
        f"network: RTT uniform {c.rtt_min_s * 1000:g}-{c.rtt_max_s * 1000:g} ms per pair; "
        f"a new connection {DIAL_BYTES} B each way (estimate)",
        f"models: {c.models}, {c.models_per_node} served per node (supply Zipf s={c.supply_s:g}), "
        f"demand Zipf s={c.zipf_s:g}, {c.job_rate:g} jobs/s per node; "
        f"a new node's first job {c.first_job_s:g} s after it starts, for a model it lacks",
        f"churn: {c.churn_per_min * 100:g}% of the nodes a minute join and as many leave "
        "(no goodbye)",
        "message sizes (bytes, measured on the real encoders): "
        + ", ".join(f"{k} {v}" for k, v in sizes.items()),
        "phases (simulated s: warm-up, rest, churn): "
        + "; ".join(f"{x.nodes} nodes {x.warmup_s:g}/{x.rest_s:g}/{x.churn_s:g}" for x in configs),
    ]
    return "\n".join(lines)


def report_size(r: dict[str, Any], config: SimConfig) -> str:
    rest, churn, first = r["rest"], r["churn"], r["first_job"]
    lines = [
        "",
        f"== {r['nodes']} nodes (seed {r['seed']}) ==",
        f"link policy: {r['policy']}",
        f"links per node: median {rest['links_median']:g}, max {rest['links_max']} at rest; "
        f"median {churn['links_median']:g}, max {churn['links_max']} under churn; "
        f"peak at any time {r['links_peak']} (budget {config.max_links}); "
        f"link requests refused by full nodes {r['links_refused']}",
    ]
    for name, phase in (("at rest", rest), ("under churn", churn)):
        kinds = ", ".join(
            f"{k.removeprefix('bytes_per_node_s_')} {v:,.0f}"
            for k, v in phase.items()
            if k.startswith("bytes_per_node_s_") and v >= 0.5
        )
        lines.append(
            f"traffic {name}: {phase['messages_per_node_s']:.2f} messages and "
            f"{phase['bytes_per_node_s']:,.0f} B per node per s (sent and received counted "
            f"once); by kind, B/s: {kinds}; busiest node {phase['busiest_node_bytes_s']:,.0f} B/s"
        )
    lines.append(
        f"churn: {r['joins']} joins, {r['leaves']} leaves in {config.churn_s:g} s; "
        f"{first['new_nodes']} new nodes' first jobs"
    )
    lines.append(
        f"a new node's first job routed: DHT round trips median {first['rounds_median']}, "
        f"p99 {first['rounds_p99']}, max {first['rounds_max']}; simulated seconds median "
        f"{_s(first['seconds_median'])}, p99 {_s(first['seconds_p99'])}; "
        f"found a live provider {_pct(first['live_pct'])}"
    )
    for name, phase in (("at rest", rest), ("under churn", churn)):
        lines.append(
            f"jobs {name}: {phase['jobs']:,} ({phase['jobs_unservable']} for a model no live "
            f"node served, left out), found a live provider {_pct(phase['jobs_live_pct'])}; "
            f"{phase['provider_lookups']} provider lookups, round trips median "
            f"{phase['lookup_rounds_median']}, p99 {phase['lookup_rounds_p99']}"
            + _failed(phase.get("jobs_failed_why"))
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """Each target: (what, met or None when this run cannot tell, the figures)."""
    out: list[tuple[str, bool | None, str]] = []
    small, large = results[0], results[-1]
    if len(results) > 1:
        a, b = small["rest"]["bytes_per_node_s"], large["rest"]["bytes_per_node_s"]
        ratio = b / a if a else float("inf")
        out.append(
            (
                f"traffic at rest per node, {large['nodes']} nodes within "
                f"{REST_RATIO_MAX:g}x of {small['nodes']}",
                ratio <= REST_RATIO_MAX,
                f"{b:,.0f} / {a:,.0f} B/s = {ratio:.2f}x",
            )
        )
    worst = [r["first_job"]["rounds_max"] for r in results]
    known = [w for w in worst if w is not None]
    out.append(
        (
            f"a new node's first job routed within {FIRST_JOB_ROUNDS_MAX} DHT round trips, "
            "every size",
            all(w <= FIRST_JOB_ROUNDS_MAX for w in known) if known else None,
            "max " + ", ".join(f"{r['nodes']}: {w}" for r, w in zip(results, worst, strict=True)),
        )
    )
    live = [r["churn"]["jobs_live_pct"] for r in results]
    out.append(
        (
            f"under churn at least {LIVE_PCT_MIN:g}% of jobs find a live provider",
            all(x >= LIVE_PCT_MIN for x in live if x is not None),
            ", ".join(f"{r['nodes']}: {_pct(x)}" for r, x in zip(results, live, strict=True)),
        )
    )
    return out


def summary(results: list[dict[str, Any]], configs: list[SimConfig]) -> str:
    lines = ["", "== summary ==", _table(results), "", "targets (issue 13):"]
    for what, met, figures in targets(results):
        verdict = "n/a" if met is None else "MET" if met else "MISSED"
        lines.append(f"  {verdict:6} {what}: {figures}")
    return "\n".join(lines)


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        "nodes", "links med/max", "msg/s rest", "B/s rest", "B/s churn", "1st job RTs max",
        "1st job s med", "live % churn",
    )  # fmt: skip
    rows = [head]
    for r in results:
        rows.append(
            (
                f"{r['nodes']:,}",
                f"{r['rest']['links_median']:g}/{r['rest']['links_max']}",
                f"{r['rest']['messages_per_node_s']:.2f}",
                f"{r['rest']['bytes_per_node_s']:,.0f}",
                f"{r['churn']['bytes_per_node_s']:,.0f}",
                str(r["first_job"]["rounds_max"]),
                _s(r["first_job"]["seconds_median"]),
                _pct(r["churn"]["jobs_live_pct"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def _failed(why: Mapping[str, int] | None) -> str:
    if not why:
        return ""
    return "; no live provider: " + ", ".join(f"{n} ({reason})" for reason, n in why.items())


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def plot(results: list[dict[str, Any]], out: Path, *, seed: int, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # after the backend is chosen

    n = [r["nodes"] for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (links, traffic), (first, live) = axes
    links.plot(n, [r["rest"]["links_median"] for r in results], "o-", label="median (rest)")
    links.plot(n, [r["rest"]["links_max"] for r in results], "s--", label="max (rest)")
    links.plot(n, [r["churn"]["links_median"] for r in results], "o-", label="median (churn)")
    links.axhline(results[0].get("max_links", 32), color="grey", ls=":", label="max_links")
    links.set(title="links per node", xlabel="nodes", ylabel="links")
    for name, key in (("rest", "rest"), ("churn", "churn")):
        traffic.plot(n, [r[key]["bytes_per_node_s"] / 1000 for r in results], "o-", label=name)
    base = results[0]["rest"]["bytes_per_node_s"] / 1000
    traffic.axhline(base * REST_RATIO_MAX, color="grey", ls=":", label="2x rest at smallest")
    traffic.set(title="bytes per node per second", xlabel="nodes", ylabel="kB/s")
    rounds = [r["first_job"] for r in results]
    first.plot(n, [f["rounds_median"] or 0 for f in rounds], "o-", label="round trips, median")
    first.plot(n, [f["rounds_max"] or 0 for f in rounds], "s--", label="round trips, max")
    first.axhline(FIRST_JOB_ROUNDS_MAX, color="grey", ls=":", label="target")
    seconds = first.twinx()
    seconds.plot(n, [f["seconds_median"] or 0 for f in rounds], "^-", color="C3", label="s, median")
    seconds.set_ylabel("simulated seconds (median)")
    first.set(title="a new node's first job", xlabel="nodes", ylabel="DHT round trips")
    live.plot(n, [r["churn"]["jobs_live_pct"] for r in results], "o-", label="under churn")
    live.plot(n, [r["rest"]["jobs_live_pct"] for r in results], "s--", label="at rest")
    live.axhline(LIVE_PCT_MIN, color="grey", ls=":", label="target")
    live.set(title="jobs that found a live provider", xlabel="nodes", ylabel="%")
    links.set_ylim(0, results[0].get("max_links", 32) + 2)
    traffic.set_ylim(bottom=0)
    first.set_ylim(bottom=0)
    for ax in (links, traffic, first, live):
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"scripts/simulate_swarm --seed {seed}{' --quick' if quick else ''} "
        f"(link policy: {results[0]['policy'].split(' ')[0]})"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
