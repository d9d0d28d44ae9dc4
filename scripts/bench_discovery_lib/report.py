"""The printed report of the discovery benchmark, with its targets table."""

from __future__ import annotations

import os
from typing import Any

from bench_report import Summary

from .common import (
    DEAD_SWARM,
    FULL_VIEW_BOUND_S,
    PROC_READY_S,
    SETTLE_S,
    TARGET_BYTES_S,
    TARGET_VIEW_S,
    VICTIM_LINKED_S,
    WATCH_AFTER_KILL_S,
)

# --------------------------------------------------------------------------- report


def fmt_s(value: float | None) -> str:
    return "not reached" if value is None else f"{value:6.2f} s"


def spread_text(s: dict[str, float] | None) -> str:
    return (
        "never"
        if s is None
        else f"min {s['min']:.2f} s, median {s['median']:.2f} s, max {s['max']:.2f} s"
    )


def report_loopback(r: dict[str, Any], summary: Summary) -> None:
    print("1. Bootstrap + DHT on loopback, in-process nodes (one trio process)")
    print(f"   {'N':>4} {'all started':>12} {'full view':>12} {'most whole':>11}  {'stop':>8}")
    for run in r.get("loopback", []):
        if "error" in run:
            print(f"   {run['n']:>4}  failed: {run['error']}")
            continue
        took, stop = run["full_view_s"], "clean" if run["stopped_cleanly"] else "cut off"
        print(
            f"   {run['n']:>4} {fmt_s(run['all_started_s']):>12} {fmt_s(took):>12}"
            f" {run['most_with_full_view']:>5}/{run['n']:<5} {run['stop_s']:6.1f} s {stop}"
        )
        print(f"        tables then: {run['tables']}; records refused so far: {run['refused']}")
        for crash in run["crashes"]:
            print(f"        {crash}")
        if run["n"] == 10:
            ok = took is not None and took < TARGET_VIEW_S
            summary.add("full view, 10 nodes, bootstrap + DHT", fmt_s(took), "< 5 s", ok)
    print("   (full view: every node's live_peers holds every other, each with a verified")
    print("   record; timed from the launch of nodes 1..N-1, node 0 already up, bounded at")
    print(f"   {FULL_VIEW_BOUND_S:.0f} s. most whole: most nodes seen at once with a full view)")


def report_mdns(mdns: dict[str, Any], summary: Summary) -> None:
    print("2. mDNS, one process per network namespace on one bridge")
    if "skipped" in mdns:
        print(f"   skipped: {mdns['skipped']}")
        return
    print(f"   {'N':>4} {'all ready':>12} {'full view':>12} {'from spawn':>12}  stop")
    for run in mdns["runs"]:
        if "full_view_from_ready_s" in run:
            print(
                f"   {run['n']:>4} {fmt_s(run['all_ready_s']):>12} "
                f"{fmt_s(run['full_view_from_ready_s']):>12} "
                f"{fmt_s(run['full_view_from_spawn_s']):>12}  "
                f"{'; '.join(run.get('stop_problems', [])) or 'clean'}"
            )
        elif "progress" in run:
            bound = PROC_READY_S + FULL_VIEW_BOUND_S
            print(f"   {run['n']:>4}  no full view in {bound:.0f} s: {run['progress']}")
        if "error" in run:
            print(f"   {run['n']:>4}  failed: {run['error']}")
        for line in run.get("warnings", []):
            print(f"        node log: {line}")
        if run["n"] == 10:
            took = run.get("full_view_from_ready_s")
            ok = took is not None and took < TARGET_VIEW_S
            summary.add("full view, 10 nodes, mDNS (from all ready)", fmt_s(took), "< 5 s", ok)
    print("   (full view timed from the last node ready, and from all processes spawned)")


def report_dead(dead: dict[str, Any] | None, summary: Summary) -> None:
    print("3. Dead peer (SIGKILLed daemon process), heartbeat 1 s, dead after 5 s")
    if dead is None:
        print("   not measured (--no-dead)")
        return
    for crash in dead.get("crashes", []):
        print(f"   {crash}")
    if "error" in dead:
        print(f"   failed: {dead['error']}")
        for i, status in sorted(dead.get("victim_elsewhere", {}).items()):
            print(f"     node {i} had it as: {status}")
        summary.add("dead peer dropped", "failed", "within the configured bound", False)
        return
    if (took := dead["victim_linked_by_all_s"]) is not None:
        print(
            f"   {DEAD_SWARM} in-process nodes; all linked the victim {took:.1f} s after its banner"
        )
    else:
        print(
            f"   {DEAD_SWARM} in-process nodes; only {dead['victim_linked_by']} linked the victim "
            f"within {VICTIM_LINKED_S:.0f} s; measured on those. The others had it as:"
        )
        for i, status in sorted(dead["victim_elsewhere"].items()):
            print(f"     node {i}: {status}")
    print(f"   left live_peers      {spread_text(dead['unlinked_s'])}")
    how = ", ".join(f"{c} {st}" for st, c in dead["left_live_peers_as"].items())
    print(f"     (its status in the table when it left: {how})")
    print(f"   dropped from table   {spread_text(dead['dropped_s'])}")
    bound = dead["bound_s"]
    print(f"   dropped by {dead['dropped_by']} nodes; bound dead_after + heartbeat = {bound:.0f} s")
    if later := dead["seen_after_kill_s"]:
        print(
            f"   its last_seen moved past the kill on {len(later)} node(s), by up to "
            f"{max(later.values()):.1f} s: a dead peer sends nothing, so a discovery hint"
        )
        print("   (a DHT provider record, for one) was taken as evidence that it was alive")
    if back := dead["back_in_table"]:
        print(f"   back in the table of {len(back)} node(s) within {WATCH_AFTER_KILL_S:.0f} s:")
        for i, what in sorted(back.items()):
            print(f"     node {i}: at {what}")
    target = f"<= {bound:.0f} s (dead_after + heartbeat)"
    for figure, key in (
        ("dead peer out of live_peers (max)", "unlinked_s"),
        ("dead peer dropped from the table (max)", "dropped_s"),
    ):
        s = dead[key]
        dropped, watched = dead["dropped_by"].split("/")
        everywhere = key == "unlinked_s" or dropped == watched
        ok = s is not None and everywhere and s["max"] <= bound
        summary.add(figure, "never" if s is None else f"{s['max']:6.2f} s", target, ok)


def report_traffic(r: dict[str, Any], window_s: float, summary: Summary) -> None:
    print(f"4. Membership traffic at rest ({SETTLE_S:.0f} s after the full view, {window_s:.0f} s)")
    target = f"< {TARGET_BYTES_S:.0f} B/s"
    lo = next((x.get("traffic") for x in r.get("loopback", []) if x.get("n") == 10), None)
    if lo is None:
        print("   loopback: not measured (no 10-node full view)")
    else:
        rate = lo["per_node_bytes_s"]
        print(
            f"   loopback, 10 nodes: {lo['bytes']} bytes on lo in {lo['window_s']:.1f} s = "
            f"{rate:.0f} B/s per node (lo before the swarms: {r['lo_baseline_bytes_s']:.0f} B/s)"
        )
        print(
            f"     at the end {lo['with_full_view_at_end']}/10 nodes had a full view; "
            f"records refused in the window: {lo['refused_in_window']}"
        )
        print(f"     tables at the end: {lo['tables_at_end']}")
        summary.add(
            "traffic per node at rest, bootstrap + DHT",
            f"{rate:6.0f} B/s",
            target,
            rate < TARGET_BYTES_S,
        )
    runs = [x for x in r["mdns"].get("runs", []) if x.get("traffic")]
    if not runs:
        print("   mDNS: not measured (" + r["mdns"].get("skipped", "no full view") + ")")
        return
    n, mt = runs[0]["n"], runs[0]["traffic"]
    rate = mt["per_node_bytes_s"]
    print(
        f"   mDNS, {n} nodes: {mt['bytes']} bytes sent on the veths in {mt['window_s']:.1f} s"
        f" = {rate:.0f} B/s per node"
    )
    print(
        f"     (mDNS itself: {mt['per_node_udp_datagrams_s']:.2f} UDP datagrams/s per node); "
        f"full view kept: {mt['full_view_kept']}; records refused: {mt['refused']}"
    )
    print(f"     tables at the end: {mt['tables_at_end']}")
    summary.add(
        f"traffic per node at rest, mDNS, {n} nodes",
        f"{rate:6.0f} B/s",
        target,
        rate < TARGET_BYTES_S,
    )


def report(r: dict[str, Any], window_s: float) -> Summary:
    summary = Summary()
    print(f"\nMachine: {os.cpu_count()} CPUs. Loopback runs isolated in: {r.get('isolation')}")
    if "error" in r:
        print(f"Loopback sections failed: {r['error']}")
    print()
    report_loopback(r, summary)
    print()
    report_mdns(r["mdns"], summary)
    print()
    report_dead(r.get("dead_peer"), summary)
    print()
    report_traffic(r, window_s, summary)
    print()
    if r.get("warnings"):
        print("Warnings the in-process nodes logged:")
        for line in r["warnings"]:
            print(f"   {line}")
        print()
    print("Summary (targets from issue 3)")
    width = max((len(row["figure"]) for row in summary), default=10)
    for row in summary:
        print(
            f"   {row['figure']:<{width}}  {row['value']:>11}  {row['target']:<32} {row['verdict']}"
        )
    return summary
