"""The MCP tools, defined once: what each takes, checks and answers.

Both transports serve these same definitions (``server.py`` on the gateway's
``/mcp``; the stdio bridge forwards to that). A tool sees the node only through
the gateway's ``Backend``, so it holds no routing of its own: ``route_inference``
is a swarm ``Request`` run by ``InferenceService`` like any other, and
``select_peer`` asks the router what it would do without running anything.

Arguments are checked here, field by field, before anything runs: an unknown
argument, a wrong type or a bad value is a ``BadToolCall`` (``BAD_REQUEST``)
naming the field. A tool answers plain JSON data (tensors as ``{"dtype",
"shape", "data"}`` with nested lists) or raises a ``SwarmError``, whose code the
server puts in the tool error it answers.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bootstrap.table import hardware_summary, live_peers
from node.errors import NodeError
from node.gateway.app import MAX_DEADLINE_MS, Backend
from node.jobs.router import Strategy
from node.json_values import BadValue, inputs_from_json, jsonable, params_from_json
from protocols import DTYPES, ErrorCode, Priority, Request, Value
from protocols.errors import ConfigError
from runners.errors import ModelNotFound


class BadToolCall(ConfigError):
    """The tool's arguments are wrong: BAD_REQUEST, naming the field."""


class NotOffered(NodeError):
    """This node's gateway was built without what the tool needs: NOT_EXECUTED."""

    code = ErrorCode.NOT_EXECUTED


Run = Callable[[Backend, "Args"], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    schema: Mapping[str, Any]  # JSON Schema of the arguments (what clients show and send)
    run: Run
    read_only: bool = True  # answers from state; changes nothing


class Args:
    """A tool call's arguments, read field by field; every misuse is a BadToolCall."""

    def __init__(self, tool: str, given: Mapping[str, Any] | None, allowed: Mapping[str, Any]):
        self.tool = tool
        self.given = dict(given or {})
        unknown = sorted(set(self.given) - set(allowed))
        if unknown:
            known = ", ".join(sorted(allowed)) or "none"
            raise BadToolCall(f"{tool}: unknown argument(s) {', '.join(unknown)}; known: {known}")

    def fail(self, name: str, message: str) -> BadToolCall:
        return BadToolCall(f"{self.tool}.{name}: {message}")

    def text(self, name: str) -> str:
        value = self.given.get(name)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, "required, a non-empty string")
        return value.strip()

    def optional_text(self, name: str, choices: list[str] | None = None) -> str | None:
        value = self.given.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, "a non-empty string when given")
        if choices is not None and value.strip().lower() not in choices:
            raise self.fail(name, f"{value!r} is not one of {', '.join(choices)}")
        return value.strip().lower() if choices is not None else value.strip()

    def priority(self) -> Priority:
        text = self.optional_text("priority", [p.name.lower() for p in Priority])
        return Priority.NORMAL if text is None else Priority.parse(text)

    def deadline_ms(self) -> int | None:
        value = self.given.get("deadline_ms")
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 < value <= MAX_DEADLINE_MS
        ):
            raise self.fail("deadline_ms", f"an integer from 1 to {MAX_DEADLINE_MS} (milliseconds)")
        return value


# ---------------------------------------------------------------------------
# the tools


async def list_backends(backend: Backend, args: Args) -> dict[str, Any]:
    """The models served on this node, the backends behind them and their state."""
    if backend.backends is None:
        raise NotOffered("this node does not describe its backends")
    answer: dict[str, Any] = redact(dict(backend.backends()))
    return answer


async def list_peers(backend: Backend, args: Args) -> dict[str, Any]:
    model = args.optional_text("model")
    status = backend.status()
    table = backend.table()
    breakers = _map(_map(_map(status.get("view")).get("routing")).get("peer_breakers"))
    peers = []
    for peer in live_peers(table) if table is not None else ():
        served = _models_of(peer.body)
        if model is not None and not any(m["name"].casefold() == model.casefold() for m in served):
            continue
        breaker = _map(breakers.get(peer.peer_id))
        peers.append(
            {
                "peer_id": peer.peer_id,
                "addrs": [f"{a}/p2p/{peer.peer_id}" for a in peer.addrs],
                "hardware": hardware_summary(peer.body),
                "models": served,
                "load": jsonable(dict(peer.load or {})),
                "health": {
                    "status": str(peer.status),
                    "seen_ago_s": round(max(0.0, table.now - peer.last_seen), 3) if table else None,
                    "breaker": breaker.get("state", "closed"),
                    "failures": breaker.get("failures", 0),
                },
            }
        )
    return {"node": status.get("peer_id"), "peers": peers}


async def swarm_status(backend: Backend, args: Args) -> dict[str, Any]:
    status = dict(backend.status())
    nodes = _nodes_by_model(backend, status)
    summary = {
        "node": status.get("peer_id"),
        "live_peers": len(live_peers(t)) if (t := backend.table()) is not None else 0,
        "models": {name: len(ids) for name, ids in sorted(nodes.items())},
    }
    return {"summary": summary, "node": redact(status)}


async def select_peer(backend: Backend, args: Args) -> dict[str, Any]:
    model = _known_model(backend, args.text("model"))
    strategy = args.optional_text("strategy", [str(s) for s in Strategy])
    priority = args.priority()
    if backend.select_peer is None:
        raise NotOffered("this node cannot preview its routing")
    found = dict(backend.select_peer(model, strategy, priority))
    if found.get("chosen") is None:
        found["why"] = (
            "no eligible node now (peer breakers open or no linked peer serves it); "
            "a job would look the model up in the DHT first"
        )
    return {"model": model, "priority": priority.name.lower(), **found}


async def route_inference(backend: Backend, args: Args) -> dict[str, Any]:
    described = backend.models().get(args.text("model").casefold())
    if described is None:
        raise ModelNotFound(f"no node of this swarm serves the model {args.text('model')!r}")
    name = str(described["name"])
    request = Request(
        id=f"mcp-{uuid.uuid4().hex}",
        model=name,
        inputs=_inputs(args, described),
        params=_params(args),
        priority=args.priority(),
        deadline_ms=args.deadline_ms(),
        strategy=args.optional_text("strategy", [str(s) for s in Strategy]),
    )

    async def no_chunks(outputs: Mapping[str, Value]) -> None:
        """Not streamed: the whole answer comes in the Result."""

    result = await backend.execute(request, no_chunks)
    meta = dict(result.meta)
    return {
        "model": name,
        "outputs": jsonable(dict(result.outputs)),
        "meta": {"served_by": meta.get("served_by"), "attempts": meta.get("attempts", 1), **meta},
    }


async def list_tasks(backend: Backend, args: Args) -> dict[str, Any]:
    nodes = _nodes_by_model(backend, backend.status())
    tasks: dict[str, list[dict[str, Any]]] = {}
    for key, described in sorted(backend.models().items()):
        task = str(described.get("task") or "unknown")
        entry = {"model": described.get("name"), "nodes": len(nodes.get(key, ()))}
        tasks.setdefault(task, []).append(entry)
    return {"tasks": [{"task": t, "models": ms} for t, ms in sorted(tasks.items())]}


# ---------------------------------------------------------------------------
# their arguments

_STRATEGY = {
    "type": "string",
    "enum": [str(s) for s in Strategy],
    "description": "how the node picks the peer (default: the node's own strategy)",
}
_PRIORITY = {"type": "string", "enum": ["high", "normal", "low"], "default": "normal"}
_TEXTS = {"type": "array", "items": {"type": "string"}}
_TENSOR = {
    "type": "object",
    "properties": {
        "dtype": {"type": "string", "enum": sorted(DTYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"description": "the values, nested lists or flat (C order)"},
    },
    "required": ["dtype", "data"],
}


def _object(properties: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(required),
        "additionalProperties": False,
    }


TOOLS: tuple[Tool, ...] = (
    Tool(
        "list_backends",
        "The models this node serves itself and the backends behind them (runner, device, "
        "circuit breaker, concurrency), and the models that failed to load with why. "
        "Never API keys or backend addresses.",
        _object({}),
        list_backends,
    ),
    Tool(
        "list_peers",
        "The live peers this node is linked to: peer id, addresses, hardware, the models each "
        "serves, its reported load and health (last heard, circuit breaker).",
        _object({"model": {"type": "string", "description": "only peers serving this model"}}),
        list_peers,
    ),
    Tool(
        "swarm_status",
        "This node's status (hardware, models, load, routing, failovers, discovery) and a "
        "summary of the swarm: live peers and how many nodes serve each model.",
        _object({}),
        swarm_status,
    ),
    Tool(
        "select_peer",
        "Which node a job for this model would run on now, and why: the router's chosen node, "
        "the order it would try, and every eligible candidate with its score (lower is "
        "better). Runs nothing.",
        _object(
            {
                "model": {"type": "string"},
                "strategy": _STRATEGY,
                "priority": _PRIORITY,
            },
            ("model",),
        ),
        select_peer,
    ),
    Tool(
        "route_inference",
        "Run one inference in the swarm: on this node or the peer the router picks, failing "
        "over as a job does. inputs: a text, a list of texts (both go to the model's text "
        "input), or an object of named inputs (texts, numbers, or tensors as "
        '{"dtype","shape","data"}). Answers the outputs (tensors as nested lists with shape '
        "and dtype) and where it ran (meta.served_by, meta.attempts).",
        _object(
            {
                "model": {"type": "string"},
                "inputs": {
                    "anyOf": [
                        {"type": "string"},
                        _TEXTS,
                        {
                            "type": "object",
                            "additionalProperties": {
                                "anyOf": [
                                    {"type": "string"},
                                    _TEXTS,
                                    {"type": "number"},
                                    {"type": "boolean"},
                                    _TENSOR,
                                ]
                            },
                        },
                    ]
                },
                "params": {
                    "type": "object",
                    "description": "model parameters (e.g. max_tokens, top_k): scalars or "
                    "lists of strings",
                },
                "priority": _PRIORITY,
                "deadline_ms": {"type": "integer", "minimum": 1, "maximum": MAX_DEADLINE_MS},
                "strategy": _STRATEGY,
            },
            ("model", "inputs"),
        ),
        route_inference,
        read_only=False,
    ),
    Tool(
        "list_tasks",
        "The tasks the swarm can do (embeddings, classification, text generation...), with "
        "the models for each and how many nodes serve each model.",
        _object({}),
        list_tasks,
    ),
)
BY_NAME: dict[str, Tool] = {t.name: t for t in TOOLS}


async def call(backend: Backend, name: str, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """Run the tool ``name``; raises BadToolCall for an unknown tool or bad arguments."""
    tool = BY_NAME.get(name)
    if tool is None:
        raise BadToolCall(f"unknown tool {name!r}; tools: {', '.join(BY_NAME)}")
    if arguments is not None and not isinstance(arguments, Mapping):
        raise BadToolCall(f"{name}: the arguments must be an object")
    return await tool.run(backend, Args(name, arguments, tool.schema["properties"]))


# ---------------------------------------------------------------------------
# helpers


def _known_model(backend: Backend, name: str) -> str:
    described = backend.models().get(name.casefold())
    if described is None:
        raise ModelNotFound(f"no node of this swarm serves the model {name!r}")
    return str(described["name"])


def _inputs(args: Args, described: Mapping[str, Any]) -> dict[str, Value]:
    try:
        return inputs_from_json(args.given.get("inputs"), described)
    except BadValue as exc:
        raise args.fail(exc.where, exc.message) from exc


def _params(args: Args) -> dict[str, Any]:
    try:
        return params_from_json(args.given.get("params"))
    except BadValue as exc:
        raise args.fail(exc.where, exc.message) from exc


def _models_of(body: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A record's models as {name, task, device}: what a caller chooses among."""
    out = []
    for m in (body or {}).get("models") or ():
        if isinstance(m, Mapping) and isinstance(m.get("name"), str):
            out.append({"name": m["name"], "task": m.get("task"), "device": m.get("device")})
    return out


def _nodes_by_model(backend: Backend, status: Mapping[str, Any]) -> dict[str, list[str]]:
    """Casefolded model name -> the ids of the nodes serving it (this one and live peers)."""
    nodes: dict[str, list[str]] = {}
    self_id = str(status.get("peer_id") or "this node")
    for m in _models_of(status):
        nodes.setdefault(m["name"].casefold(), []).append(self_id)
    table = backend.table()
    for peer in live_peers(table) if table is not None else ():
        for m in _models_of(peer.body):
            nodes.setdefault(m["name"].casefold(), []).append(peer.peer_id)
    return nodes


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# Credentials that can ride in a URL: user:password@, and key-like query parameters.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|secret|password|sig|signature)=)[^&\s\"']+"
)


def redact(data: Any) -> Any:
    """``data`` with any credentials inside URLs in its strings replaced by ``***``.

    The node already keeps keys and backend addresses out of what it shows; this
    is the last guard for text that quotes a URL (a load failure's reason).
    """
    if isinstance(data, str):
        return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", data))
    if isinstance(data, Mapping):
        return {k: redact(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    return data


def dumps(data: Any) -> str:
    """Tool answers as compact JSON text (the text content clients show a model)."""
    return json.dumps(data, separators=(",", ":"), default=str)
