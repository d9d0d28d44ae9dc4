"""How results and status read on a terminal, and as JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from protocols import Result, Tensor, Value


def jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return {"dtype": value.dtype, "shape": list(value.shape), "data": value.numpy().tolist()}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def result_json(result: Result, extra: Mapping[str, Any] | None = None) -> str:
    body = {"id": result.id, "outputs": jsonable(result.outputs), "meta": dict(result.meta)}
    return json.dumps({**body, **(extra or {})})


def value_text(value: Value) -> str:
    if isinstance(value, Tensor):
        array = value.numpy()
        head = np.array2string(array.reshape(-1)[:6], precision=4, separator=", ")
        more = " ..." if array.size > 6 else ""
        return f"{value.dtype}{list(value.shape)} {head}{more}"
    return repr(value)


def result_text(result: Result) -> str:
    lines = [f"{name}: {value_text(value)}" for name, value in result.outputs.items()]
    meta = result.meta
    served = str(meta.get("served_by", "?"))
    line = f"served by {served} ({meta.get('runner', '?')} on {meta.get('device', '?')})"
    line += f" in {meta.get('run_ms', '?')} ms, queued {meta.get('queue_ms', '?')} ms"
    if meta.get("forwarded_by"):
        line += f", forwarded by {meta['forwarded_by']}"
    attempts = meta.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        line += f", after {attempts} attempts"
    if meta.get("took_ms") is not None:
        line += f"; {meta['took_ms']} ms in all"
    lines.append(line)
    return "\n".join(lines)


def status_text(peer_id: str, body: Mapping[str, Any]) -> str:
    hw = body.get("hardware", {})
    cpu, ram = hw.get("cpu", {}), hw.get("ram", {})
    lines = [f"node      {peer_id}"]
    if body.get("software"):
        lines.append(f"version   {body['software'].get('version', '?')}")
    lines += [f"address   {a}" for a in body.get("addrs", [])]
    lines.append(
        f"cpu       {cpu.get('model', '?')} ({cpu.get('physical_cores', '?')} cores, "
        f"{cpu.get('logical_cores', '?')} threads, {cpu.get('usable_cores', '?')} usable)"
    )
    if ram:
        lines.append(
            f"memory    {ram.get('total', 0) / 2**30:.1f} GiB total, "
            f"{ram.get('available', 0) / 2**30:.1f} GiB available"
        )
    for dev in hw.get("openvino", []):
        state = dev.get("full_name") if dev.get("available") else f"absent ({dev.get('reason')})"
        lines.append(f"openvino  {dev.get('name')}: {state}")
    for dev in hw.get("cuda", []):
        lines.append(
            f"cuda      {dev.get('index')}: {dev.get('name')} "
            f"({dev.get('total_memory', 0) / 2**30:.1f} GiB)"
        )
    if not hw.get("cuda"):
        lines.append(f"cuda      none ({hw.get('cuda_status', 'not probed')})")
    for model in body.get("models", []):
        lines.append(
            f"model     {model.get('name')}  {model.get('task')}  {model.get('runner')}"
            f"/{model.get('device')}  {model.get('precision')}  max batch {model.get('max_batch')}"
        )
    if not body.get("models"):
        lines.append("model     (none)")
    view = body.get("view", {})
    for name, reason in view.get("models_failed", {}).items():
        lines.append(f"model     {name}  NOT LOADED: {reason}")
    for name, state in view.get("runners", {}).items():
        lines.append(f"backend   {name}: {_runner_state(state)}")
    load, stats = body.get("load"), body.get("view", {}).get("stats", {})
    if load:
        q = load.get("queue_depth", {})
        lines.append(
            f"load      in flight {load.get('in_flight')}, queued high/normal/low "
            f"{q.get('high')}/{q.get('normal')}/{q.get('low')}, "
            f"ewma latency {_ms(load.get('ewma_latency_ms'))}"
        )
    if stats:
        lines.append(
            f"served    {stats.get('served')} ok, {stats.get('failed')} failed, "
            f"{stats.get('forwarded')} forwarded"
        )
    routing = view.get("routing", {})
    if routing:
        broken = routing.get("peer_breakers", {})
        held = ", ".join(f"{p[-8:]} {b.get('state')}" for p, b in broken.items()) or "none"
        lines.append(
            f"routing   {routing.get('strategy')}, {routing.get('failovers', 0)} failovers, "
            f"peers held back: {held}"
        )
    for source, problem in view.get("discovery", {}).items():
        lines.append(f"discovery {source}: {problem}")
    access = view.get("access", {})
    if access:
        private = "private swarm" if access.get("private_swarm") else "open swarm"
        allow = ", allow-list" if access.get("allow_list") else ""
        lines.append(f"access    {private}{allow}, {access.get('refused', 0)} refused")
    peers = view.get("peers", [])
    linked = sum(1 for p in peers if p.get("status") == "linked")
    lines.append(f"peers     {len(peers)} known, {linked} linked ('swarm peers' lists them)")
    return "\n".join(lines)


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
    return ", ".join(parts) or "-"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value} ms"


def peers_text(rows: list[Mapping[str, Any]], problems: Mapping[str, str]) -> str:
    """The peer table as a terminal table."""
    if not rows:
        lines = ["no peers known"]
    else:
        header = ("PEER", "STATUS", "FOUND BY", "SEEN", "MODELS", "LOAD", "HARDWARE", "ADDRESSES")
        table = [header]
        for r in rows:
            load = r.get("load") or {}
            depth = load.get("queue_depth") or {}
            queued = sum(v for v in depth.values() if isinstance(v, int))
            table.append(
                (
                    str(r.get("peer_id", ""))[-12:],
                    str(r.get("status", "")) + (f" ({r['reason']})" if r.get("reason") else ""),
                    ",".join(r.get("found_by", [])),
                    f"{r.get('seen_ago_s', 0):.0f}s ago",
                    ",".join(r.get("models", [])) or "-",
                    f"{load.get('in_flight', 0)} run, {queued} queued" if load else "-",
                    str(r.get("hardware", "")),
                    " ".join(r.get("addrs", [])),
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table
        ]
    lines += [f"discovery {source}: {problem}" for source, problem in problems.items()]
    return "\n".join(lines)


def model_rows(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every model the node and its linked peers serve: who serves it, and how."""
    found: dict[str, dict[str, Any]] = {}
    for model in body.get("models", []):
        name = str(model.get("name", "?"))
        row = found.setdefault(name.lower(), {"model": name, "local": None, "peers": []})
        row["local"] = {k: model.get(k) for k in ("task", "runner", "device", "precision")}
    for peer in body.get("view", {}).get("peers", []):
        if peer.get("status") != "linked":
            continue
        for name in peer.get("models", []):
            row = found.setdefault(name.lower(), {"model": name, "local": None, "peers": []})
            row["peers"].append(peer.get("peer_id"))
    return [found[k] for k in sorted(found)]


def models_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The models table: name, how this node runs it, and which peers serve it."""
    if not rows:
        return "no models served by this node or its linked peers"
    table = [("MODEL", "HERE", "PEERS")]
    for r in rows:
        local = r.get("local")
        here = f"{local.get('task')} {local.get('runner')}/{local.get('device')}" if local else "-"
        peers = r.get("peers") or []
        shown = ", ".join(str(p)[-8:] for p in peers[:4]) + (" ..." if len(peers) > 4 else "")
        table.append((str(r.get("model")), here, f"{len(peers)}: {shown}" if peers else "0"))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
