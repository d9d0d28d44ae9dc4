"""How status, peers and models read on a terminal, and as JSON for scripts (a
job's result: ``results``, re-exported here).

The ``*_table`` functions build rich renderables from plain data (a record
body, rows); ``to_text`` shows what they print as on a plain terminal, which
is what the tests read. The CLI prints them through a Console that drops
colour when stdout is not a terminal.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Column, Table
from rich.text import Text

from .results import result_json as result_json
from .results import result_text as result_text
from .results import value_text as value_text


def plain_console(file: Any = None, *, width: int | None = None) -> Console:
    """A console that prints text as it is: peers' records may hold ``[markup]`` or
    ``:emoji:`` codes (an IPv6 address does), which must show as written."""
    return Console(
        file=file,
        width=width,
        markup=False,
        emoji=False,
        highlight=False,
        color_system=None if file is not None else "auto",
    )


def to_text(renderable: RenderableType, width: int = 80) -> str:
    """What ``renderable`` prints as on a plain ``width``-column terminal (no colour)."""
    console = plain_console(io.StringIO(), width=width)
    with console.capture() as captured:
        console.print(renderable)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def status_table(peer_id: str, body: Mapping[str, Any], gateway: str | None = None) -> Group:
    """A node's status: a key/value grid of the node, then its models as a table."""
    hw = body.get("hardware", {})
    cpu, ram = hw.get("cpu", {}), hw.get("ram", {})
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    row = grid.add_row
    row("node", peer_id)
    if body.get("software"):
        row("version", str(body["software"].get("version", "?")))
    if gateway is not None:
        row("gateway", gateway)
    for addr in body.get("addrs", []):
        row("address", str(addr))
    view = body.get("view", {})
    if isinstance(view.get("reach"), Mapping):
        _reach_rows(row, body, view["reach"])
    row(
        "cpu",
        f"{cpu.get('model', '?')} ({cpu.get('physical_cores', '?')} cores, "
        f"{cpu.get('logical_cores', '?')} threads, {cpu.get('usable_cores', '?')} usable)",
    )
    if ram:
        row(
            "memory",
            f"{ram.get('total', 0) / 2**30:.1f} GiB total, "
            f"{ram.get('available', 0) / 2**30:.1f} GiB available",
        )
    for dev in hw.get("openvino", []):
        state = dev.get("full_name") if dev.get("available") else f"absent ({dev.get('reason')})"
        row("openvino", f"{dev.get('name')}: {state}")
    for dev in hw.get("cuda", []):
        row(
            "cuda",
            f"{dev.get('index')}: {dev.get('name')} ({dev.get('total_memory', 0) / 2**30:.1f} GiB)",
        )
    if not hw.get("cuda"):
        row("cuda", f"none ({hw.get('cuda_status', 'not probed')})")
    for name, reason in view.get("models_failed", {}).items():
        row("not loaded", f"{name}: {reason}")
    for name, state in view.get("runners", {}).items():
        row("backend", f"{name}: {_runner_state(state)}")
    load, stats = body.get("load"), view.get("stats", {})
    if load:
        q = load.get("queue_depth", {})
        row(
            "load",
            f"in flight {load.get('in_flight')}, queued high/normal/low "
            f"{q.get('high')}/{q.get('normal')}/{q.get('low')}, "
            f"ewma latency {_ms(load.get('ewma_latency_ms'))}",
        )
    if stats:
        row(
            "served",
            f"{stats.get('served')} ok, {stats.get('failed')} failed, "
            f"{stats.get('forwarded')} forwarded",
        )
    fairness = view.get("fairness")
    if isinstance(fairness, Mapping):
        row("fairness", _fairness_line(fairness))
    routing = view.get("routing", {})
    if routing:
        broken = routing.get("peer_breakers", {})
        held = ", ".join(f"{p[-8:]} {b.get('state')}" for p, b in broken.items()) or "none"
        row(
            "routing",
            f"{routing.get('strategy')}, {routing.get('failovers', 0)} failovers, "
            f"peers held back: {held}",
        )
    verification = view.get("verification", {})
    if verification:
        row("checks", _verification(verification))
    for source, problem in view.get("discovery", {}).items():
        row("discovery", f"{source}: {problem}")
    access = view.get("access", {})
    if access:
        private = "private swarm" if access.get("private_swarm") else "open swarm"
        allow = ", allow-list" if access.get("allow_list") else ""
        row("access", f"{private}{allow}, {access.get('refused', 0)} refused")
    if "view" not in body:  # the machine without a daemon: no peers, no models to tell
        return Group(grid)
    peers = view.get("peers", [])
    linked = sum(1 for p in peers if p.get("status") == "linked")
    row("peers", f"{len(peers)} known, {linked} linked ('swarm peers' lists them)")
    shares: list[RenderableType] = []
    if isinstance(fairness, Mapping) and fairness.get("peers"):
        shares = [Text(""), *shares_table(fairness)]
    models = body.get("models", [])
    if not models:
        row("models", "none here (forwarding only)")
        return Group(grid, *shares)
    return Group(grid, Text(""), _models_here(models), *shares)


def _fairness_line(fairness: Mapping[str, Any]) -> str:
    totals = fairness.get("totals") or {}
    over = ", ".join(
        f"{r} {totals[r]}" for r in ("rate", "in_flight", "queued", "high") if totals.get(r)
    )
    state = "on" if fairness.get("enabled") else "off (first come, first served)"
    return (
        f"{state}, {fairness.get('tracked', 0)} peers tracked, {totals.get('refused', 0)} refused"
        f", over budget: {over or 'none'}"
    )


def shares_table(fairness: Mapping[str, Any]) -> list[RenderableType]:
    """Each peer's share of this node, busiest first: weight, its jobs waiting and held
    here, served, refused, jobs over its budget, and its part of the work served lately
    beside the part its weight gives it; then why each peer was over budget."""
    table = _table(
        "PEER",
        "W",
        "QUEUED",
        "IN FLIGHT",
        "SERVED",
        "REFUSED",
        "OVER BUDGET",
        "SHARE",
        "FAIR",
        title="fair share (per peer)",
    )
    for column in table.columns[1:]:
        column.justify = "right"
    notes: list[RenderableType] = []
    rows = [r for r in fairness.get("peers") or [] if isinstance(r, Mapping)]
    other = fairness.get("other")
    for r in [*rows, *([other] if isinstance(other, Mapping) else [])]:
        peer = str(r.get("peer", ""))[-12:] if "peer" in r else f"{r.get('peers')} other"
        over = r.get("over_budget") or {}
        table.add_row(
            peer,
            _weight(r.get("weight")),
            str(r.get("queued", 0)),
            str(r.get("in_flight", 0)),
            str(r.get("served", 0)),
            str(r.get("refused", 0)),
            str(sum(v for v in over.values() if isinstance(v, int))),
            _percent(r.get("share")),
            _percent(r.get("fair")),
        )
        why = ", ".join(f"{k} {v}" for k, v in over.items() if v)
        if why:
            notes.append(Text(f"{peer} over budget: {why}"))
    return [table, *notes]


def _weight(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "-"


def _percent(value: Any) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, int | float) else "-"


def _models_here(models: Sequence[Mapping[str, Any]]) -> Table:
    table = _table("MODEL", "TASK", "RUNNER", "DEVICE", "PRECISION", "BATCH", title="models")
    for m in models:
        table.add_row(
            str(m.get("name")),
            str(m.get("task")),
            str(m.get("runner")),
            str(m.get("device")),
            str(m.get("precision")),
            str(m.get("max_batch")),
        )
    return table


def _table(*columns: str, title: str | None = None) -> Table:
    """A table of the house style: a header, no lines between rows, plain when piped."""
    table = Table(
        *columns,
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),  # two spaces between columns, not three: 80 columns are few
    )
    for column in table.columns:
        column.overflow = "fold"  # ids and addresses wrap rather than lose their ends
    return table


def status_text(peer_id: str, body: Mapping[str, Any], gateway: str | None = None) -> str:
    return to_text(status_table(peer_id, body, gateway))


def _reach_rows(row: Any, body: Mapping[str, Any], reach: Mapping[str, Any]) -> None:
    """Whether peers can dial this node and why, what it announces, its relays, and
    the models it reaches only through other peers (why those jobs are slower)."""
    verdict = str(reach.get("reach", "unknown"))
    row("reach", f"{verdict}: {reach.get('why', '')}")
    if not body.get("addrs"):
        row("address", "none announced (peers outside the LAN cannot dial this node)")
    held = reach.get("relays_held")
    if held is None:  # the relay manager's own view: {"held": [{"relay": id, ...}]}
        relays_view = reach.get("relays")
        entries = relays_view.get("held", []) if isinstance(relays_view, Mapping) else []
        held = [e.get("relay") for e in entries if isinstance(e, Mapping)]
    relays = [str(r)[-8:] for r in held or []]
    shown = ", ".join(relays) if relays else "none"
    offered = ", offering one to peers" if reach.get("relay_offered") else ""
    row("relays", f"{shown} held{offered}")
    for model, entry in (reach.get("forwarding") or {}).items():
        via = ", ".join(str(p)[-8:] for p in entry.get("via", [])[:3])
        row("indirect", f"{model} via {via}: {entry.get('why', '')}")
    if reach.get("forwarding") or reach.get("forwarded_jobs"):
        row("", f"{reach.get('forwarded_jobs', 0)} job(s) answered through another peer")
    asked, served = reach.get("asked") or {}, reach.get("dialbacks") or {}
    row(
        "dialback",
        f"{asked.get('answers', 0)} answered us, {asked.get('no_answer', 0)} unanswered; "
        f"for peers {served.get('dials_ok', 0)} reached, {served.get('dials_failed', 0)} "
        f"not, {served.get('refused', 0)} refused",
    )


def _runner_state(state: Mapping[str, Any]) -> str:
    """One line for a runner's live state: circuit, mode, batching, key use; no secrets."""
    parts = []
    nested = state.get("endpoint")
    endpoint: Mapping[str, Any] = nested if isinstance(nested, Mapping) else state
    if endpoint.get("breaker"):
        parts.append(f"circuit {endpoint['breaker']}")
        parts.append(f"in flight {endpoint.get('in_flight', 0)}/{endpoint.get('max_concurrency')}")
        keys = endpoint.get("keys") or []
        if keys:
            parts.append("keys " + " ".join(f"{k.get('label')}:{k.get('uses')}" for k in keys))
    if state.get("mode"):
        parts.append(f"{state['mode']} mode")
    batching = state.get("batching")
    if isinstance(batching, Mapping) and batching.get("calls"):
        mean = batching.get("rows", 0) / batching["calls"]
        parts.append(f"batched {batching['calls']} calls, mean {mean:.1f} rows")
    if state.get("summary"):  # e.g. an OpenVINO runner's measured precision and why
        parts.append(str(state["summary"]))
    return ", ".join(parts) or "-"


def _verification(v: Mapping[str, Any]) -> str:
    """Checks made, their verdicts, and the peers held back for wrong answers."""
    verdicts = v.get("verdicts", {})
    counts = "/".join(str(verdicts.get(k, 0)) for k in ("agree", "disagree", "unsure"))
    held = [
        f"{peer[-8:]} ({row.get('strikes')} strikes in {row.get('checked')}, "
        f"{row.get('held_for_s')} s left)"
        for peer, row in (v.get("peers") or {}).items()
        if row.get("held_back")
    ]
    rate = v.get("rate")
    share = f"{rate:.0%}" if isinstance(rate, int | float) else "?"
    return (
        f"{share} of routed jobs: {v.get('checks', 0)} checks, "
        f"{v.get('verified_jobs', 0)} verify jobs, agree/disagree/unsure {counts}; "
        f"held back for wrong answers: {', '.join(held) or 'none'}"
    )


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value} ms"


# How a peer's connection runs, in a word that fits the column.
PATHS = {"direct": "direct", "hole-punched": "punched", "relayed": "relayed"}


def peers_table(rows: Sequence[Mapping[str, Any]], problems: Mapping[str, str]) -> Group:
    """The peers a node knows: status, how found, models, load, where.

    Made for 80 columns: the peer id is cut to its last 12 characters, only the
    first address is shown, as host:port, and a peer that is not linked gets a
    line under the table with when it was last heard from and why (``--json``
    has every field whole).
    """
    table = _table("PEER", "STATUS", "PATH", "FOUND BY", "MODELS", "RUN/Q", "ADDRESS")
    # One model and one source a line: columns as wide as their longest name, so the
    # address keeps room; only the address may fold.
    for name in ("PEER", "STATUS", "PATH", "FOUND BY", "MODELS", "RUN/Q"):
        _column(table, name).no_wrap = True
    notes: list[RenderableType] = []
    for r in rows:
        load = r.get("load") or {}
        depth = load.get("queue_depth") or {}
        queued = sum(v for v in depth.values() if isinstance(v, int))
        addrs = [_host_port(str(a)) for a in r.get("addrs", [])]
        short = str(r.get("peer_id", ""))[-12:]
        table.add_row(
            short,
            str(r.get("status", "")),
            PATHS.get(str(r.get("path")), "-"),
            "\n".join(r.get("found_by", [])),
            "\n".join(r.get("models", [])) or "-",
            f"{load.get('in_flight', 0)}/{queued}" if load else "-",
            (addrs[0] + (f" +{len(addrs) - 1}" if len(addrs) > 1 else "")) if addrs else "-",
        )
        if r.get("status") != "linked":
            why = f": {r['reason']}" if r.get("reason") else ""
            heard = f"last heard {_ago(r.get('seen_ago_s'))} ago"
            notes.append(Text(f"{short} {r.get('status')}, {heard}{why}"))
    parts: list[RenderableType] = [table, *notes] if rows else [Text("no peers known")]
    parts += [Text(f"discovery {source}: {problem}") for source, problem in problems.items()]
    return Group(*parts)


def _ago(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _column(table: Table, header: str) -> Column:
    return next(c for c in table.columns if c.header == header)


def _host_port(addr: str) -> str:
    """``/ip4/H/tcp/P[/p2p/ID]`` as ``H:P`` (``[H]:P`` for ip6); any other form as it is,
    without the peer id."""
    parts = addr.partition("/p2p/")[0].split("/")
    if len(parts) == 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[3] == "tcp":
        host = f"[{parts[2]}]" if parts[1] == "ip6" else parts[2]
        return f"{host}:{parts[4]}"
    return "/".join(parts)


def peers_text(rows: Sequence[Mapping[str, Any]], problems: Mapping[str, str]) -> str:
    return to_text(peers_table(rows, problems))


def model_rows(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every model the node and its linked peers serve: who serves it, and how."""
    found: dict[str, dict[str, Any]] = {}
    view = body.get("view", {})
    content = view.get("content", {})
    sizes = {s.get("content"): s.get("size") for s in content.get("shares", [])}
    counts = content.get("providers", {})

    def row_of(name: str) -> dict[str, Any]:
        new: dict[str, Any] = {
            "model": name,
            "local": None,
            "peers": [],
            "content": None,
            "size": None,
        }
        return found.setdefault(name.lower(), new)

    for model in body.get("models", []):
        row = row_of(str(model.get("name", "?")))
        row["local"] = {k: model.get(k) for k in ("task", "runner", "device", "precision")}
        row["content"] = model.get("content")
    for peer in view.get("peers", []):
        if peer.get("status") != "linked":
            continue
        for name in peer.get("models", []):
            row = row_of(name)
            row["peers"].append(peer.get("peer_id"))
            row["content"] = row["content"] or (peer.get("model_content") or {}).get(name)
    for row in found.values():
        cid = row["content"]
        row["size"] = sizes.get(cid)
        # Providers in the swarm as this node sees it: linked peers that share it, and us.
        row["providers"] = counts.get(cid, 0) + (1 if cid in sizes else 0) if cid else 0
    return [found[k] for k in sorted(found)]


def models_table(rows: Sequence[Mapping[str, Any]]) -> RenderableType:
    """The models table: name, how this node runs it, and which peers serve it."""
    if not rows:
        return Text("no models served by this node or its linked peers")
    table = _table("MODEL", "HERE", "PEERS", "CONTENT", "SIZE", "PROVIDERS")
    for r in rows:
        local = r.get("local")
        here = f"{local.get('task')} {local.get('runner')}/{local.get('device')}" if local else "-"
        peers = r.get("peers") or []
        shown = ", ".join(str(p)[-8:] for p in peers[:4]) + (" ..." if len(peers) > 4 else "")
        cid, size = r.get("content"), r.get("size")
        table.add_row(
            str(r.get("model")),
            here,
            f"{len(peers)}: {shown}" if peers else "0",
            f"{cid[:12]}~" if isinstance(cid, str) else "-",  # whole in --json
            f"{size / 1e6:.1f} MB" if isinstance(size, int) else "-",
            str(r.get("providers", 0)),
        )
    return table


def models_text(rows: Sequence[Mapping[str, Any]]) -> str:
    return to_text(models_table(rows))
